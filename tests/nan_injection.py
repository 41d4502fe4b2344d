"""A callback for `lorafit fit` subprocesses in tests: infinite pixels in one rank's batch at one step.

Loaded by the CLI from ``--trainer.callbacks+={"class_path": "nan_injection.InfPixels", ...}`` with
tests/ on the child's PYTHONPATH (tests/test_ddp.py).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class InfPixels(Callback):
    """Fill ``pixel_values`` with inf on ``rank`` at optimizer step ``step``: that rank's loss is NaN."""

    def __init__(self, step: int = 1, rank: int = 0):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("inf"))
