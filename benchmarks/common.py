"""What the benchmark scripts share: where the real data lies, finding its patients, and one clear
line instead of a traceback when the data is missing or unusable."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from idcmap.errors import IdcmapError  # noqa: E402
from idcmap.loader import find_patient_folders  # noqa: E402

DATA_ROOT = ROOT.parent / "shared" / "data"  # read in place, never copied into the project


def require_folder(folder: Path) -> None:
    """Exit with one `skipped:` line when `folder` (real data) is absent."""
    if not folder.is_dir():
        sys.exit(f"skipped: {folder} is absent (the real patches live in ../shared/data)")


def patient_folders(folder: Path, count: int = 0) -> list[Path]:
    """The first `count` (0 = all) patient folders below `folder`; exits with one `skipped:` line
    when it is absent or holds no patient."""
    require_folder(folder)
    try:
        folders = find_patient_folders(folder)
    except IdcmapError as error:
        sys.exit(f"skipped: {error}")
    return folders[:count] if count else folders


def run(main: Callable[[], None]) -> None:
    """Run a script's `main`, turning idcmap's errors about its input into one line and exit 1."""
    try:
        main()
    except IdcmapError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: {error}")
