"""Training curves the kohya guides read: ``loss/average``, ``loss/epoch`` and images per second.

``loss/current`` (every step) is logged by the module itself; this callback adds:

- ``loss/average``: moving average of the step losses over the last ``average_window`` steps
  (default: one epoch's worth, kohya's definition), so the trend shows through the noise of
  random timesteps;
- ``loss/epoch``: mean step loss of the finished epoch (over all ranks);
- ``perf/images_per_sec``: training images per second of step time (forward, backward, optimizer)
  over all ranks, averaged over the last ``average_window`` steps. Data loading, validation and
  sampling are left out, so the number measures the training step and does not drop during a
  round of samples.

The step losses are rank 0's (no collective per step); ``loss/epoch`` is averaged over ranks once
per epoch. The losses are summed and averaged on the device and only loggers read them (every
``trainer.log_every_n_steps``): reading them each step would make the host wait for the GPU
(lorafit/bench/host_syncs.py). The step time is the host's; it equals the device's over a window
because the module's NaN check (nonfinite.py) keeps the host at most one step ahead.
"""

from __future__ import annotations

import collections
import math
import time

import lightning.pytorch as pl
import torch

_FALLBACK_WINDOW = 100  # for loaders of unknown length


class TrainingMetrics(pl.Callback):
    """Log ``loss/average``, ``loss/epoch`` and ``perf/images_per_sec``.

    Args:
        average_window: Steps in the moving average of ``loss/average`` and images/s; empty = the
            number of batches in one epoch (kohya's ``loss/average``).
    """

    def __init__(self, average_window: int | None = None):
        self.average_window = average_window
        self._losses: torch.Tensor | None = None  # ring buffer of the last `window` step losses, on the device
        self._count = 0  # losses written into the ring so far (the next goes to _count % window)
        self._speed: collections.deque = collections.deque()
        self._epoch_sum: torch.Tensor | None = None
        self._epoch_count = 0
        self._batch_started = 0.0

    def _window(self, trainer) -> int:
        if self.average_window:
            return self.average_window
        batches = trainer.num_training_batches
        return int(batches) if isinstance(batches, int) or (batches and math.isfinite(batches)) else _FALLBACK_WINDOW

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_sum, self._epoch_count = None, 0
        window = self._window(trainer)
        if self._speed.maxlen != window:
            self._speed = collections.deque(self._speed, maxlen=window)
            self._resize_ring(window)

    def _resize_ring(self, window: int) -> None:
        """A ring of ``window`` slots holding the newest losses so far, oldest first."""
        if self._losses is None:
            return
        size = self._losses.numel()
        start = self._count % size if self._count > size else 0
        kept = torch.cat([self._losses[start:], self._losses[:start]])[: min(self._count, size)][-window:]
        self._losses = torch.zeros(window, device=kept.device)
        self._losses[: len(kept)] = kept
        self._count = len(kept)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._batch_started
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        # Lightning hands back the loss divided by accumulate_grad_batches (what it backpropagates).
        value = loss.detach().float() * trainer.accumulate_grad_batches
        if self._losses is None:
            self._losses = torch.zeros(self._speed.maxlen or self._window(trainer), device=value.device)
        window = self._losses.numel()
        self._losses[self._count % window] = value
        self._count += 1
        self._epoch_sum = value if self._epoch_sum is None else self._epoch_sum + value
        self._epoch_count += 1
        images = len(batch["captions"]) if isinstance(batch, dict) and "captions" in batch else 0
        self._speed.append((images, elapsed))
        batch_size = images or None
        pl_module.log(
            "loss/average",
            self._losses[: min(self._count, window)].mean(),
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        seconds = sum(s for _, s in self._speed)
        if images and seconds > 0:
            per_sec = sum(n for n, _ in self._speed) / seconds * trainer.world_size
            # A host tensor: Lightning would copy a Python float to the GPU, waiting for the queue.
            pl_module.log(
                "perf/images_per_sec", torch.tensor(per_sec), on_step=True, on_epoch=False, batch_size=batch_size
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_count:
            mean = self._epoch_sum / self._epoch_count
            # Every rank reaches this hook, so the one collective (sync_dist) per epoch is safe.
            pl_module.log("loss/epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
