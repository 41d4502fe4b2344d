"""Files written atomically (a temporary file beside the target, then a rename): checkpoints, configs.

Lightning's ``TorchCheckpointIO`` writes local files through an fsspec transaction whose temporary
file lives in the system temp directory. On a cluster that is usually another filesystem than the
run directory (node-local ``/tmp`` vs shared scratch), so the final "move" is a copy, and a job
killed during it (OOM, preemption, ``kill -9``) leaves a truncated ``last.ckpt`` that cannot be
resumed from. Writing next to the target and ``os.replace``-ing it is atomic on every POSIX
filesystem: a reader sees the old file or the new one, never half of one.

This module imports neither torch nor Lightning at import time (torch only inside
:func:`atomic_torch_save`): ``lorafit caption`` and ``lorafit review`` write caption files through
it, and importing torch + Lightning would make their first write take seconds. The checkpoint
plugin, which subclasses a Lightning class, lives in :mod:`lorafit.training.checkpoint_io`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def temporary_sibling(path: Path) -> Path:
    """The temporary name a write of ``path`` goes through, in the same directory.

    Hidden, and free of ``ckpt_`` and ``last``: Lightning finds HPC checkpoints by any file name
    containing ``ckpt_`` (a temporary ``.hpc_ckpt_2.ckpt.tmp`` would count as version 2) and last
    checkpoints by a ``last*.ckpt`` name. Fixed per target, so a leftover of a killed write is
    simply overwritten by the next one.
    """
    digest = hashlib.sha1(path.name.encode()).hexdigest()[:12]
    return path.with_name(f".partial-{digest}.tmp")


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable (a power cut after it must not bring back the old file).
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary sibling, flushed to disk, then renamed over ``path``."""
    import torch

    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename."""
    return _atomic_write(path, lambda handle: handle.write(text.encode()))
