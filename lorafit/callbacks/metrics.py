"""Training curves the kohya guides read: ``loss/average``, ``loss/epoch`` and images per second.

``loss/current`` (every step) is logged by the module itself; this callback adds:

- ``loss/average``: mean loss per training image over the last ``average_window`` steps
  (default: one epoch's worth, kohya's definition), so the trend shows through the noise of
  random timesteps;
- ``loss/epoch``: mean loss per training image of the finished epoch;
- ``perf/images_per_sec``: training images per second of step time (forward, backward, optimizer)
  over all ranks, averaged over the last ``average_window`` steps. Data loading, validation and
  sampling are left out, so the number measures the training step and does not drop during a
  round of samples.

Both losses are exact over every image of every rank, whatever each rank's batch sizes, and
across a resume: a run stopped and resumed mid-epoch logs the same ``loss/epoch`` and
``loss/average`` as one that was never stopped (the partial sums travel in the checkpoint).

No step makes the host wait for the GPU (lorafit/bench/host_syncs.py): the sums stay on the
device, ``loss/average`` is reduced over ranks only at the steps the loggers write (every
``trainer.log_every_n_steps``, with an all-reduce that needs no barrier, collectives.py), and
``loss/epoch`` once per epoch by torchmetrics. The step time is the host's; it equals the device's
over a window because the module's NaN check (nonfinite.py) keeps the host at most one step ahead.
"""

from __future__ import annotations

import collections
import math
import time

import lightning.pytorch as pl
import torch
from torchmetrics.aggregation import MeanMetric

from lorafit.distributed.collectives import all_reduce_in_place, logged_this_step

_FALLBACK_WINDOW = 100  # for loaders of unknown length


def _per_image(loss: torch.Tensor, images: int) -> torch.Tensor:
    """The batch's mean loss once per image: torchmetrics' mean over them is the image-weighted mean.

    Not ``MeanMetric.update(loss, weight=images)``: in torchmetrics 1.9 a weight is ignored under
    ``nan_strategy="disable"``, and every other strategy reads the value on the host (``nans.any()``)
    each step. ``expand`` is a view: nothing is copied.
    """
    return loss.reshape(1).expand(max(images, 1))


class TrainingMetrics(pl.Callback):
    """Log ``loss/average``, ``loss/epoch`` and ``perf/images_per_sec``.

    Args:
        average_window: Steps in the moving average of ``loss/average`` and images/s; empty = the
            number of batches in one epoch (kohya's ``loss/average``).
    """

    def __init__(self, average_window: int | None = None):
        self.average_window = average_window
        # The epoch's loss: summed per rank on the device, reduced over ranks by torchmetrics at epoch end.
        self._epoch = MeanMetric(nan_strategy="disable")
        # The last `window` steps' (loss sum, image count) on this rank, as a ring on the device. Not
        # torchmetrics' RunningMean: it keeps one metric state per window slot and reduces them all
        # in Python at every compute, O(window) operations per step for a window of one epoch.
        self._ring: torch.Tensor | None = None
        self._count = 0  # steps written into the ring so far (the next goes to _count % window)
        self._speed: collections.deque = collections.deque()
        self._batch_started = 0.0
        self._restored: dict | None = None

    def _window(self, trainer) -> int:
        if self.average_window:
            return self.average_window
        batches = trainer.num_training_batches
        return int(batches) if isinstance(batches, int) or (batches and math.isfinite(batches)) else _FALLBACK_WINDOW

    def on_train_start(self, trainer, pl_module) -> None:
        self._epoch.to(pl_module.device)
        if self._restored is not None:
            self._restore(self._restored, trainer.global_rank, pl_module.device)
            self._restored = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        window = self._window(trainer)
        if self._speed.maxlen != window:
            self._speed = collections.deque(self._speed, maxlen=window)
            self._resize_ring(window)

    def _ordered(self) -> torch.Tensor:
        """The ring's filled slots, oldest first."""
        size = self._ring.shape[0]
        start = self._count % size if self._count > size else 0
        return torch.cat([self._ring[start:], self._ring[:start]])[: min(self._count, size)]

    def _resize_ring(self, window: int, device: torch.device | None = None) -> None:
        """A ring of ``window`` slots holding the newest steps so far."""
        if self._ring is None:
            if device is not None:
                self._ring = torch.zeros(window, 2, device=device)
            return
        kept = self._ordered()[-window:]
        self._ring = torch.zeros(window, 2, device=kept.device)
        self._ring[: len(kept)] = kept
        self._count = len(kept)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._batch_started
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        images = len(batch["captions"]) if isinstance(batch, dict) and "captions" in batch else 0
        # Lightning hands back the loss divided by accumulate_grad_batches (what it backpropagates).
        value = loss.detach().float() * trainer.accumulate_grad_batches
        weight = max(images, 1)
        if self._ring is None:
            self._ring = torch.zeros(self._speed.maxlen or self._window(trainer), 2, device=value.device)
        slot = self._ring[self._count % self._ring.shape[0]]
        slot[0] = value * weight
        slot[1].fill_(weight)  # a fill, not a tensor made from a host number: no copy to the device
        self._count += 1
        self._epoch.update(_per_image(value, weight))
        self._speed.append((images, elapsed))
        batch_size = images or None
        logged = logged_this_step(trainer)
        if logged:
            # Every rank reaches this step (the condition depends on the step count only), so the
            # all-reduce pairs up; it needs no barrier, and the logger reads the value anyway.
            totals = all_reduce_in_place(self._ordered().sum(0), "sum")
            pl_module.log("loss/average", totals[0] / totals[1], on_step=True, on_epoch=False, batch_size=batch_size)
        seconds = sum(s for _, s in self._speed) if logged and images else 0.0  # the window: on logged steps only
        if seconds > 0:
            per_sec = sum(n for n, _ in self._speed) / seconds * trainer.world_size
            # A host tensor: Lightning would copy a Python float to the GPU, waiting for the queue.
            pl_module.log(
                "perf/images_per_sec", torch.tensor(per_sec), on_step=True, on_epoch=False, batch_size=batch_size
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch.update_count:
            # torchmetrics reduces the sums over ranks here (every rank reaches this hook): the mean
            # over every image of the epoch, exact even when ranks trained different numbers of images.
            # It is then the same on every rank; sync_dist (Lightning's mean of equal values, once per
            # epoch) only keeps Lightning from warning that an epoch value was not reduced.
            pl_module.log("loss/epoch", self._epoch.compute(), on_step=False, on_epoch=True, sync_dist=True)
        self._epoch.reset()

    # ---- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The partial sums of the epoch and the window, over all ranks, for an exact resume.

        Lightning builds a checkpoint on every rank (and writes rank 0's), so the reductions here
        pair up; the ring's slots line up across ranks because every rank has trained the same steps.
        """
        if self._ring is None:
            return {}
        epoch = torch.stack([self._epoch.mean_value, self._epoch.weight]).reshape(2).clone()
        return {
            "ring": all_reduce_in_place(self._ordered().clone(), "sum").cpu(),
            "epoch": all_reduce_in_place(epoch, "sum").cpu(),
            "epoch_updates": self._epoch.update_count,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Applied when training starts, once this rank's number and device are known.
        self._restored = dict(state_dict) or None

    def _restore(self, state: dict, rank: int, device: torch.device) -> None:
        """Rank 0 takes the sums of all ranks, the others start from zero: the totals are the same."""
        ring = state["ring"].to(device) if rank == 0 else torch.zeros_like(state["ring"], device=device)
        self._ring, self._count = torch.zeros(max(len(ring), 1), 2, device=device), 0
        self._ring[: len(ring)] = ring
        self._count = len(ring)
        if rank == 0 and state["epoch_updates"]:
            self._epoch.mean_value.fill_(float(state["epoch"][0]))
            self._epoch.weight.fill_(float(state["epoch"][1]))
            self._epoch._update_count = state["epoch_updates"]  # compute() refuses a metric never updated
        elif state["epoch_updates"]:
            self._epoch._update_count = state["epoch_updates"]
