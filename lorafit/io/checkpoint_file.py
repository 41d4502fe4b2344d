"""Is this file a checkpoint lorafit can resume from? Asked before a model is built or a file written.

A ``--ckpt_path`` that is a folder, a truncated copy, some other tool's file or a pickle crafted
to run code used to end in a traceback from deep inside torch or Lightning (the pickle was never
run: lorafit loads with ``weights_only=True``). Here each is one line: the file is read the same
safe way, memory-mapped so a large checkpoint costs no full read, and must hold what ``lorafit
fit`` writes: the ``state_dict`` of the LoRA weights and lorafit's own ``lorafit`` section.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorafit.errors import LorafitError

_WRITTEN_BY = "resume from a checkpoints/last.ckpt or hpc_ckpt_N.ckpt that `lorafit fit` wrote"


def _unreadable(error: BaseException) -> str:
    """Why torch could not open a file, in words (its own messages quote miniz and enforce lines)."""
    text = str(error)
    if "central directory" in text or "zip archive" in text or isinstance(error, EOFError):
        return "it is truncated or corrupt (a copy cut short, or damaged bytes)"
    if "zipfile_serialization" in text or "invalid load key" in text:
        return "it is not a file torch.save wrote"
    return f"it cannot be read ({' '.join(text.split())[:80] or type(error).__name__})"


def check_resume_checkpoint(path: str | os.PathLike, key: str = "--ckpt_path") -> None:
    """Raises a one-line :class:`LorafitError` unless ``path`` is a complete lorafit checkpoint."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise LorafitError(f"{key} {path} does not exist; {_WRITTEN_BY} (or `--ckpt_path last`)")
    if not path.is_file():
        raise LorafitError(f"{key} {path} is not a file; {_WRITTEN_BY}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # weights_only refused a global: the file pickles Python objects, which are never run here.
        raise LorafitError(
            f"{key} {path} is not a lorafit checkpoint: it holds pickled Python objects beyond tensors, which "
            f"lorafit does not load; {_WRITTEN_BY}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise LorafitError(f"{key} {path} is not a lorafit checkpoint: {_unreadable(error)}; {_WRITTEN_BY}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "lorafit" not in checkpoint:
        raise LorafitError(
            f"{key} {path} is not a lorafit checkpoint (it holds no lorafit training state); {_WRITTEN_BY}"
        )
