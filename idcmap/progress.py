"""Progress bars: on a terminal only, so that a log (`2> log`) gets no cursor codes."""
from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(items: Iterable, show: bool, **options) -> tqdm:
    """`items` in a tqdm bar, drawn only where `show` is True and stderr is a terminal (tqdm's
    `disable=None`); elsewhere the bar is silent and iterates `items` as they are. `options` go to
    tqdm (desc, unit, ...)."""
    return tqdm(items, disable=None if show else True, **options)
