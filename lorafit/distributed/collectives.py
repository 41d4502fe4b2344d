"""All-reduces that never make the host wait, for values reduced every step.

Lightning's ``strategy.reduce`` (and so ``self.log(..., sync_dist=True)``) runs
``torch.distributed.barrier()`` before each all-reduce. With NCCL a barrier blocks the host until
the GPU has run everything queued, so a per-step reduction through it stalls every step (see
lorafit/bench/host_syncs.py). ``all_reduce`` alone is queued on the GPU in order with the step's
kernels and needs no barrier: every rank calls it at the same point of the same step.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.distributed as dist

from lorafit.distributed.host_readback import HostReadback


def all_reduce_in_place(tensor: torch.Tensor, op: Literal["sum", "mean"]) -> torch.Tensor:
    """``tensor`` summed or averaged over all ranks, in place (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if op == "mean" and dist.get_backend() != "gloo":  # gloo has no AVG
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
        return tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(dist.get_world_size()) if op == "mean" else tensor


class DeferredSigtermCheck:
    """Lightning's per-step DDP check for SIGTERM on rank 0, without stalling every step.

    Lightning 2.6 runs ``_TrainingEpochLoop._broadcast_sigterm_tensor`` before each batch when
    several processes train: it makes a tensor from a host number on the GPU, broadcasts rank 0's
    flag and reads it with ``.item()``, two host syncs per step on every rank (bench/host_syncs.py
    counts them). This replacement keeps the broadcast (one per step, as before, so the collectives
    still pair up with Lightning's signal handler) but fills a device tensor in place and reads the
    broadcast value a step later through a pinned copy, so every rank stops at the same step, one
    step later than Lightning would.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.flag: torch.Tensor | None = None
        self.broadcasts = HostReadback()

    def __call__(self) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self.flag is None:
            self.flag = torch.zeros(1, device=self.trainer.strategy.root_device)
        self.flag.fill_(1.0 if getattr(self.trainer, "received_sigterm", False) else 0.0)
        dist.broadcast(self.flag, src=0)
        self.broadcasts.push(self.flag)
        if any(value == 1 for (value,), _ in self.broadcasts.collect(keep=1)):
            with contextlib.suppress(Exception):
                dist.barrier()  # as Lightning does: all ranks reach this point before exiting
            raise SIGTERMException()


def defer_lightning_sigterm_check(trainer) -> None:
    """Install :class:`DeferredSigtermCheck` on ``trainer``'s epoch loop (if this Lightning has the check)."""
    loop = trainer.fit_loop.epoch_loop
    if callable(getattr(loop, "_broadcast_sigterm_tensor", None)):
        loop._broadcast_sigterm_tensor = DeferredSigtermCheck(trainer)


def logged_this_step(trainer) -> bool:
    """Whether the loggers write this training step: Lightning's own rule (``should_update_logs``)
    without its ``should_stop`` clause, which could differ between ranks, so every rank agrees and a
    collective for a logged value pairs up. Values only loggers read are computed on these steps only:
    Lightning's ``self.log`` costs about a millisecond a call, and an all-reduce a round trip."""
    every = trainer.log_every_n_steps
    if not every:
        return False
    # The counter Lightning's LearningRateMonitor and logger connector read (+1: not yet incremented here).
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1
    return step % every == 0
