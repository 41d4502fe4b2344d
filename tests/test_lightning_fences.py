"""The Lightning internals lorafit relies on are still there, and still used the way lorafit assumes.

lorafit overrides or reads a few private pieces of Lightning, each for a reason given where it is
used. pyproject.toml bounds Lightning to the tested minor versions; when a new one is allowed,
these tests say at once which fence broke instead of a fix silently coming undone:

- ``LightningCLI._parse_ckpt_path`` (lorafit/cli/lightning_cli.py): replaced so ``--ckpt_path FILE``
  keeps the config's model settings instead of the checkpoint's.
- ``_TrainingEpochLoop._broadcast_sigterm_tensor`` (lorafit/distributed/collectives.py): replaced
  by a check that reads its broadcast a step late, so DDP steps never wait on the host.
- The fit loop's progress counters (lorafit/data/datamodule.py): which epoch and batch a resumed
  run restarts at.
- ``RichProgressBar._get_train_description`` (lorafit/callbacks/progress.py): the epoch label.
- ``_TrainingEpochLoop._batches_that_stepped`` (lorafit/distributed/collectives.py): which steps the
  loggers write, so logger-only values are computed on those steps only.
- ``LightningModule._log_hyperparams`` / ``LightningDataModule._log_hyperparams``
  (lorafit/cli/trainer_setup.py): switched off so the loggers get lorafit's whole config once.
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


def test_the_rich_bar_still_labels_epochs_through_the_method_lorafit_replaces():
    from lightning.pytorch.callbacks import RichProgressBar

    from lorafit.callbacks.progress import LorafitProgressBar

    epoch_start = inspect.getsource(RichProgressBar.on_train_epoch_start)
    assert "self._get_train_description(trainer.current_epoch)" in epoch_start
    assert LorafitProgressBar._get_train_description is not RichProgressBar._get_train_description


def test_lightning_still_logs_hyperparameters_only_when_the_flag_lorafit_clears_is_set():
    from lightning.pytorch.loggers.utilities import _log_hyperparams

    source = inspect.getsource(_log_hyperparams)
    assert "pl_module._log_hyperparams" in source and "datamodule._log_hyperparams" in source

    class Module(pl.LightningModule):
        def __init__(self, rank: int = 8):
            super().__init__()
            self.save_hyperparameters()

    assert Module()._log_hyperparams is True  # what save_hyperparameters() sets by default, and lorafit clears


def test_logged_this_step_agrees_with_lightnings_logger_connector_on_every_step():
    """lorafit computes logger-only values on the steps Lightning writes them (the step counter
    ``_batches_that_stepped``); a change in Lightning's rule would drop or misplace logged values."""
    import torch

    from lorafit.distributed.collectives import logged_this_step

    decisions = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            decisions.append((logged_this_step(self.trainer), self.trainer._logger_connector.should_update_logs))
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.randn(14, 2), batch_size=1)
    trainer = pl.Trainer(
        max_steps=7,
        accumulate_grad_batches=2,
        log_every_n_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module(), data)
    assert len(decisions) == 14
    assert [ours for ours, _ in decisions] == [theirs for _, theirs in decisions]
    assert sum(ours for ours, _ in decisions) == 4  # optimizer steps 3 and 6, two batches each
