"""A progress bar with an ETA for the tools that draw many images (``generate``, ``grid``, ``probe``).

72 grid cells take minutes on a CPU; without a bar the tool looks hung until the end. tqdm writes
to stderr, so stdout keeps only the results (``probe`` prints its verdict there) for scripts.
``TQDM_DISABLE=1`` turns the bars off (tqdm reads its own environment variables).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def image_progress(total: int, what: str) -> tqdm:
    """A bar over ``total`` images, described by ``what`` ("grid", "probe", ...); use as a context manager."""
    terminal = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=what,
        unit="image",
        file=sys.stderr,
        dynamic_ncols=True,
        # Redrawn in place on a terminal; into a log file (no terminal) an update every 10 s at most.
        mininterval=0.5 if terminal else 10.0,
    )
