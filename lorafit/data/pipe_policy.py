"""When ``data.shards: "pipe:CMD"`` may run CMD.

webdataset reads a ``pipe:`` URL by running the rest as a shell command (``pipe:aws s3 cp
s3://bucket/x.tar -``); lorafit streams and indexes shards through webdataset, so such a value in
a config runs whatever it says, as the user. Typed by the user, or in their own config, that is
the feature. It is not when the config comes from elsewhere:

* a config read from a **run folder** (one with lorafit's ``checkpoints/``, ``lora/``, an
  ``hpc_ckpt_*.ckpt`` or a run lock beside it): run folders are shared and downloaded to resume
  or reproduce someone's run, and their ``config.yaml`` is a record, not a script to trust;
* a **SLURM job** (``SLURM_JOB_ID`` set): the config is read when the job starts, and again at each
  requeue, from shared storage, possibly long after it was checked.

There a ``pipe:`` value is refused before any shard is read, unless the environment variable
``LORAFIT_ALLOW_PIPE=1`` allows it (``lorafit submit --allow_pipe`` sets it in the job script).
Not a config key on purpose: the file being distrusted could set that key itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import LorafitError

ALLOW_ENV = "LORAFIT_ALLOW_PIPE"
SHARD_KEYS = ("shards", "val_shards")
# What marks a folder as a lorafit run folder (written by `lorafit fit` beside its config.yaml).
_RUN_MARKERS = ("checkpoints", "lora", ".lorafit.lock")


def pipe_urls(value: Any) -> list[str]:
    """The ``pipe:`` entries of a ``data.shards`` value (a string or a list of them)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(item) for item in items if isinstance(item, str) and item.strip().startswith("pipe:")]


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds what ``lorafit fit`` writes into a run folder."""
    return any((folder / name).exists() for name in _RUN_MARKERS) or any(folder.glob("hpc_ckpt_*.ckpt"))


def _pipes_in_file(path: Path) -> list[str]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []  # the CLI reports an unreadable config itself
    data = loaded.get("data") if isinstance(loaded, dict) else None
    if not isinstance(data, dict):
        return []
    data = data.get("init_args", data)
    return [url for key in SHARD_KEYS for url in pipe_urls(data.get(key))]


def refuse_untrusted_pipes(data: dict[str, Any], config_files: list[str | os.PathLike]) -> None:
    """Raises a one-line :class:`LorafitError` for a ``pipe:`` shard source that may not run here.

    Args:
        data: The parsed ``data`` section (``shards``, ``val_shards``).
        config_files: The ``--config`` files the run was given, in order.
    """
    urls = [url for key in SHARD_KEYS for url in pipe_urls(data.get(key))]
    if not urls or os.environ.get(ALLOW_ENV) == "1":
        return
    where = None
    if os.environ.get("SLURM_JOB_ID"):
        where = f"in a SLURM job (job {os.environ['SLURM_JOB_ID']})"
    for config in map(Path, config_files):
        if is_run_folder(config.parent) and _pipes_in_file(config):
            where = f"in {config}, a config read from a run folder"
            break
    if where is None:
        return
    raise LorafitError(
        f"data.shards {urls[0]!r} runs a shell command (webdataset's pipe:), which lorafit refuses {where}; "
        f"if you trust the command, allow it with {ALLOW_ENV}=1 (lorafit submit --allow_pipe for jobs)"
    )
