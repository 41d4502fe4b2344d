"""One round of training samples across ranks, with the training-only state off the accelerator.

**Ranks.** Under DDP every rank draws its share of the round's images (image ``i`` on rank
``i mod world``) and rank 0 gathers them to write and log. When rank 0 drew every image alone,
the other ranks went on to the next step and waited for it in the gradient all-reduce; a long
round (many prompts, SDXL at 1024², hires fix) ran into the process group's timeout (NCCL: 30
min by default) and killed the run. Now no rank waits longer than about one image.

**Memory.** An 8 GB card that trains SDXL with the low-VRAM recipe has little left for sampling.
For the round, the optimizer state and the gradients of the LoRA (the training-only tensors)
move to host memory and come back afterwards, bit for bit; the frozen parts kept on the host for
cached data (lorafit/training/host_parts.py) come to the device one at a time: the text encoders
while the prompts are encoded, then the VAE while images are drawn and decoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


def rank_share(count: int, rank: int, world: int) -> list[int]:
    """The indices of ``count`` items that ``rank`` of ``world`` draws (round robin: equal shares ±1)."""
    return list(range(rank, count, world))


def gather_on_rank_zero(mine: dict[int, Any], trainer) -> dict[int, Any] | None:
    """Every rank's ``{index: result}`` merged on global rank 0 (None on the others).

    A collective: every rank calls it once per round, at the same point.
    """
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return mine
    gathered: list | None = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return {index: result for part in gathered for index, result in part.items()}


def move_training_state(optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> list:
    """Copy the optimizers' state tensors and their parameters' gradients to ``device``, dropping the originals.

    Nothing else refers to the originals, so their memory is free for the round of samples (the
    point of this). Gradients are taken off their parameters (torch refuses a gradient on another
    device than its parameter) and held aside. Returns what :func:`restore_training_state` needs.
    """
    moved = []
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                # bitsandbytes' paged state manages its own memory; it stays where it is.
                if isinstance(value, torch.Tensor) and value.device != device and not getattr(value, "is_paged", False):
                    moved.append((state, key, value.device))
                    state[key] = value.to(device, copy=True)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.grad.device != device:
                    moved.append((param, param.grad.to(device, copy=True), param.grad.device))
                    param.grad = None
    return moved


def restore_training_state(moved: list) -> None:
    """Put back, bit for bit and on their devices, the tensors :func:`move_training_state` moved."""
    for owner, key_or_grad, device in moved:
        if isinstance(owner, dict):
            owner[key_or_grad] = owner[key_or_grad].to(device, copy=True)
        else:
            owner.grad = key_or_grad.to(device, copy=True)


@contextlib.contextmanager
def training_state_on_host(trainer) -> Iterator[None]:
    """The optimizer state and gradients in host memory for the duration (accelerators only)."""
    device = trainer.strategy.root_device
    if device.type == "cpu":
        yield
        return
    moved = move_training_state(trainer.optimizers, torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the freed blocks back, so the round can use them
    try:
        yield
    finally:
        restore_training_state(moved)
