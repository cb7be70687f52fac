"""Progress bars on stderr, with one switch for the whole process.

Several jobs of a study share one terminal; their bars would interleave, so the study's worker
processes turn bars off here and report through the study's own start and end lines.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_shown = True


def show_bars(shown: bool) -> None:
    """Turn every drivekd progress bar of this process on or off."""
    global _shown
    _shown = shown


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr. `disable` as tqdm reads it (None: only on a terminal), and always
    disabled while `show_bars(False)` holds."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if not _shown:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
