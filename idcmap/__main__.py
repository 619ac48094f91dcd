"""The `idcmap` console script and `python -m idcmap`: the CLI, with Ctrl-C during the seconds
that loading torch takes ending in exit status 130 rather than a traceback."""
from __future__ import annotations

import sys


def main() -> None:
    """Import the CLI (torch loads here) and run it."""
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("idcmap: interrupted while starting; nothing was written\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
