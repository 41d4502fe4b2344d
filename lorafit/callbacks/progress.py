"""The training progress bar: epochs counted as people count them, and when the whole run will end.

Lightning's bar names the epochs from 0 against ``max_epochs - 1`` ("Epoch 1/1" during the second
of two epochs) and its time estimate covers the current epoch only. A LoRA run is judged by when it
ends, sample rounds and exports included, so the bar adds the run's share done and its time left:
the optimizer steps still to do (``trainer.estimated_stepping_batches``, which counts epochs,
``max_steps`` and gradient accumulation) at the wall-clock pace of the steps this process has run so
far (a resumed run measures its own pace). Lightning's version number (``v_num``) is left out.

The bar is drawn at most every ``min_interval_s`` seconds (and at each epoch's last batch), as tqdm
does, not after every batch as Lightning's ``refresh_rate`` counts: redrawing it cost 0.2 ms of host
time a step on the toy demo (issue 19), and a GPU step of a few tens of milliseconds is host-bound.
"""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import RichProgressBar


def epoch_label(current_epoch: int, max_epochs: int | None) -> str:
    """``Epoch 2/2`` during the second of two epochs; ``Epoch 2`` when the run has no epoch limit."""
    if max_epochs is None or max_epochs < 0 or max_epochs == math.inf:
        return f"Epoch {current_epoch + 1}"
    return f"Epoch {current_epoch + 1}/{max_epochs}"


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``, as Rich shows the epoch's own times."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class RunClock:
    """The run's share done and time left, from optimizer steps and the wall-clock pace of this process."""

    def __init__(self) -> None:
        self.first_step: int | None = None
        self.first_time = 0.0

    def tick(self, global_step: int, now: float | None = None) -> None:
        """Note an optimizer step count; the first one seen starts the clock (setup is not counted)."""
        if self.first_step is None:
            self.first_step, self.first_time = global_step, time.monotonic() if now is None else now

    def summary(self, global_step: int, total_steps: float, now: float | None = None) -> str | None:
        """``"40% 2:13 left"``; None until a pace is known or when the run has no known length."""
        if self.first_step is None or not math.isfinite(total_steps) or total_steps <= 0:
            return None
        done = global_step - self.first_step
        if done <= 0:
            return None
        elapsed = (time.monotonic() if now is None else now) - self.first_time
        left = max(0.0, total_steps - global_step) * elapsed / done
        return f"{100 * min(global_step / total_steps, 1):.0f}% {format_duration(left)} left"


class LorafitProgressBar(RichProgressBar):
    """Rich progress bar with epochs counted from 1 and the whole run's progress and time left."""

    def __init__(self, min_interval_s: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = RunClock()
        self.min_interval_s = min_interval_s
        self._drawn_at = -math.inf

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own (0-based, against max_epochs - 1); fenced in tests/test_lightning_fences.py.
        label = epoch_label(current_epoch, self.trainer.max_epochs)
        return f"{label:{len(self.validation_description)}}"  # as wide as "Validation", as Lightning pads it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.tick(trainer.global_step)
        now = time.monotonic()
        if now - self._drawn_at < self.min_interval_s and batch_idx + 1 != trainer.num_training_batches:
            return  # the next drawing shows this batch too (Lightning sets the count, not adds to it)
        self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        # The training loss of the previous step, read by the NaN/Inf guard without waiting for the
        # device (lorafit/training/nonfinite.py), rather than logged through Lightning every step.
        loss = getattr(getattr(pl_module, "nonfinite", None), "last_loss", None)
        if loss is not None:
            items = {"loss": loss, **items}
        run = self.clock.summary(trainer.global_step, trainer.estimated_stepping_batches)
        return {"run": run, **items} if run else items
