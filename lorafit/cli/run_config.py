"""``<run dir>/config.yaml`` and the loggers' copy of the config, written once every check has passed.

Imported only when ``fit``/``validate`` run (it imports Lightning).
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback

from lorafit.io.atomic import atomic_write_text
from lorafit.loggers.run_config import log_run_config


class RunDirConfig(SaveConfigCallback):
    """Save the resolved config as ``<default_root_dir>/config.yaml``, beside the LoRA files, and log it.

    Written when training (or validation) starts, not at setup as Lightning's callback does: by then
    the checkpoint of a resumed run has been loaded and every resume check has passed, so a refused
    resume leaves the run folder as it was (its config.yaml still describes its checkpoint).
    Overwriting is intended: a resumed or requeued run rewrites the same run's config (through a
    temporary file, so a kill mid-write leaves the previous one). The loggers get the same config,
    once (lorafit/loggers/run_config.py).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Deferred to :meth:`on_train_start` / :meth:`on_validation_start` (see the class docstring)."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")  # Lightning's save: rank 0 writes, every rank syncs

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # under fit, validation rounds come before on_train_start
            super().setup(trainer, pl_module, "validate")

    def save_config(self, trainer, pl_module, stage) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)
        if trainer.loggers:
            log_run_config(trainer.loggers, json.loads(self.parser.dump(self.config, skip_none=False, format="json")))
