"""The Lightning internals lorafit relies on are still there, and still used the way lorafit assumes.

lorafit overrides or reads three private pieces of Lightning, each for a reason given where it is
used. pyproject.toml bounds Lightning to the tested minor versions; when a new one is allowed,
these tests say at once which fence broke instead of a fix silently coming undone:

- ``LightningCLI._parse_ckpt_path`` (lorafit/cli/lightning_cli.py): replaced so ``--ckpt_path FILE``
  keeps the config's model settings instead of the checkpoint's.
- ``_TrainingEpochLoop._broadcast_sigterm_tensor`` (lorafit/distributed/collectives.py): replaced
  by a check that reads its broadcast a step late, so DDP steps never wait on the host.
- The fit loop's progress counters (lorafit/data/datamodule.py): which epoch and batch a resumed
  run restarts at.
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from lorafit.distributed.collectives import DeferredSigtermCheck, defer_lightning_sigterm_check


def _calls(owner: type, method: str) -> bool:
    return f"self.{method}()" in inspect.getsource(owner)


def test_lightning_cli_still_parses_ckpt_path_through_the_method_lorafit_replaces():
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert _calls(LightningCLI, "_parse_ckpt_path"), "LightningCLI no longer calls _parse_ckpt_path"
    from lorafit.cli.lightning_cli import _build_cli_class

    cli_class = _build_cli_class()[0]
    assert cli_class._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_the_epoch_loop_still_checks_sigterm_through_the_method_lorafit_replaces():
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))
    assert _calls(_TrainingEpochLoop, "_broadcast_sigterm_tensor")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    defer_lightning_sigterm_check(trainer)
    assert isinstance(trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor, DeferredSigtermCheck)


def test_the_progress_counters_the_data_module_reads_exist():
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.fit_loop.epoch_progress.current.processed, int)
    assert isinstance(trainer.fit_loop.epoch_loop.batch_progress.current.processed, int)
