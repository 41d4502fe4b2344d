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
per epoch.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Optional

import lightning.pytorch as pl
import torch

_FALLBACK_WINDOW = 100  # for loaders of unknown length


class TrainingMetrics(pl.Callback):
    """Log ``loss/average``, ``loss/epoch`` and ``perf/images_per_sec``.

    Args:
        average_window: Steps in the moving average of ``loss/average`` and images/s; empty = the
            number of batches in one epoch (kohya's ``loss/average``).
    """

    def __init__(self, average_window: Optional[int] = None):
        self.average_window = average_window
        self._losses: collections.deque = collections.deque()
        self._speed: collections.deque = collections.deque()
        self._epoch_sum = 0.0
        self._epoch_count = 0
        self._batch_started = 0.0

    def _window(self, trainer) -> int:
        if self.average_window:
            return self.average_window
        batches = trainer.num_training_batches
        return int(batches) if isinstance(batches, int) or (batches and math.isfinite(batches)) else _FALLBACK_WINDOW

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_sum, self._epoch_count = 0.0, 0
        window = self._window(trainer)
        if self._losses.maxlen != window:
            self._losses = collections.deque(self._losses, maxlen=window)
            self._speed = collections.deque(self._speed, maxlen=window)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._batch_started
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        # Lightning hands back the loss divided by accumulate_grad_batches (what it backpropagates).
        value = float(loss.detach()) * trainer.accumulate_grad_batches
        self._losses.append(value)
        self._epoch_sum += value
        self._epoch_count += 1
        images = len(batch["captions"]) if isinstance(batch, dict) and "captions" in batch else 0
        self._speed.append((images, elapsed))
        batch_size = images or None
        pl_module.log("loss/average", sum(self._losses) / len(self._losses), on_step=True, on_epoch=False,
                      batch_size=batch_size)
        seconds = sum(s for _, s in self._speed)
        if images and seconds > 0:
            per_sec = sum(n for n, _ in self._speed) / seconds * trainer.world_size
            pl_module.log("perf/images_per_sec", per_sec, on_step=True, on_epoch=False, batch_size=batch_size)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_count:
            mean = torch.tensor(self._epoch_sum / self._epoch_count, device=pl_module.device)
            # Every rank reaches this hook, so the one collective (sync_dist) per epoch is safe.
            pl_module.log("loss/epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
