"""A progress bar over modules or tensors for the toolbox verbs (an SDXL extract runs for minutes).

tqdm writes to stderr, so stdout keeps only the verbs' results and reports, for scripts; it redraws
in place on a terminal and writes a line every 10 s at most into a log file. ``TQDM_DISABLE=1``
turns the bars off (tqdm reads its own environment variables).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], what: str, total: int | None = None, unit: str = "module") -> Iterator[T]:
    """``items`` with a bar described by ``what`` (``resize``, ``extract`` ...)."""
    terminal = sys.stderr.isatty()
    yield from tqdm(
        items,
        total=total,
        desc=f"lorafit {what}",
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if terminal else 10.0,
        leave=terminal,
    )
