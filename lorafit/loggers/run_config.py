"""The run's configuration in the loggers: logged once, whole, and as it was actually used.

Lightning logs a module's and a data module's ``__init__`` arguments by itself (flattened, and in
TensorBoard beside a placeholder metric ``hp_metric = -1``), while the trainer and callback settings
that make a run (epochs, precision, export, samples) are missing. lorafit switches that off and logs
the complete resolved config instead, the one ``config.yaml`` holds, once per run start:

- TensorBoard: ``hparams.yaml`` in the log directory and the HPARAMS tab, whose metric column is
  the run's own ``loss/epoch`` curve (no placeholder value is written);
- W&B: the run config, nested by section (``model.rank``), with the logger's own settings filled in
  with what W&B used (the real ``offline`` mode even when ``WANDB_MODE=offline`` chose it, the
  derived run id, name and directory).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

# The HPARAMS tab lists each run's config beside the last value of these curves (logged by
# lorafit/callbacks/metrics.py); declaring them writes no value.
HPARAMS_METRICS = ("loss/epoch", "loss/average")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"rank": 8}}`` -> ``{"model.rank": 8}``; lists and None become text (TensorBoard takes scalars)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _logger_entries(config: Mapping[str, Any]) -> Iterable[dict]:
    entries = (config.get("trainer") or {}).get("logger")
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, dict) and isinstance(entry.get("init_args"), dict):
            yield entry


def with_wandb_as_used(config: Mapping[str, Any], logger) -> dict[str, Any]:
    """``config`` with the W&B logger's settings replaced by what the W&B run actually uses."""
    config = copy.deepcopy(dict(config))
    run = logger.experiment
    used = {
        "offline": bool(getattr(run, "offline", False)),
        "id": run.id,
        "name": run.name,
        "save_dir": logger.save_dir,
    }
    for entry in _logger_entries(config):
        if str(entry.get("class_path", "")).rsplit(".", 1)[-1] in ("WandbRunLogger", "WandbLogger"):
            entry["init_args"].update({key: value for key, value in used.items() if key in entry["init_args"]})
    return config


def log_run_config(loggers: Iterable, config: Mapping[str, Any]) -> None:
    """Log the resolved run ``config`` (nested by section) to each of ``loggers``, once."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_hyperparams(with_wandb_as_used(config, logger))
        elif isinstance(logger, TensorBoardLogger):
            _log_to_tensorboard(logger, config)
        else:
            logger.log_hyperparams(dict(config))


def _log_to_tensorboard(logger, config: Mapping[str, Any]) -> None:
    from lightning.pytorch.core.saving import save_hparams_to_yaml
    from torch.utils.tensorboard.summary import hparams

    # metrics={}: Lightning keeps the config and writes no hp_metric placeholder (nor the HPARAMS tab).
    logger.log_hyperparams(dict(config), metrics={})
    # The tab, with the run's own curves as its metrics: declaring a metric writes no value of it.
    experiment, session_start, session_end = hparams(flatten(config), dict.fromkeys(HPARAMS_METRICS, 0.0))
    writer = logger.experiment.file_writer
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    # Lightning writes hparams.yaml only if it is absent, and by now it wrote an empty one.
    save_hparams_to_yaml(os.path.join(logger.log_dir, logger.NAME_HPARAMS_FILE), dict(config))
