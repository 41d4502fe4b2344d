"""Global random-number-generator states in checkpoints, one per DDP rank.

Training noise does not use them (it is seeded by position, see LoraDiffusionModule), but anything
that draws from the global generators does: LoRA dropout, augmentations in the main process, the
base seed PyTorch draws for DataLoader workers. Lightning does not checkpoint them, so a resumed
run would continue from whatever state the new process happens to be in.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def rng_states() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states.

    Only tensors and plain Python values, so the checkpoint still loads with
    ``torch.load(weights_only=True)``: NumPy's key array is stored as a tensor.
    """
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_rng_states() -> list[dict]:
    """Every rank's :func:`rng_states`, indexed by global rank (a collective under DDP).

    Lightning builds the checkpoint on every rank before rank 0 writes it, so all ranks get here.
    """
    states = rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [states]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(per_rank: list[dict], rank: int) -> None:
    """Set this process's generators to the saved states of ``rank`` (of rank 0 if the world shrank)."""
    states = per_rank[rank] if rank < len(per_rank) else per_rank[0]
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
