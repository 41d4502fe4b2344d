"""Weights & Biases logging whose run survives resumes and SLURM requeues.

Lightning's ``WandbLogger`` starts a new W&B run each time the process starts unless it is given
the id of the old one, and a requeued SLURM job cannot know that id. Here the id is derived from
the run directory (``trainer.default_root_dir``): the sbatch templates key that by
``$SLURM_JOB_ID``, so every requeue of a job, and every ``--ckpt_path`` resume in the same
directory, continues the same W&B run (``resume="allow"``), its loss curves joined at the
restored step.
"""

from __future__ import annotations

import hashlib
import os
import re

from lightning.pytorch.loggers import WandbLogger

from lorafit.errors import LorafitError

INSTALL_HINT = "pip install lorafit[wandb]"


def stable_run_id(run_dir: str | os.PathLike) -> str:
    """A W&B run id that is a pure function of the absolute run directory: ``<dir name>-<hash>``."""
    path = os.path.abspath(os.fspath(run_dir))
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.basename(path)).strip("-")[:48] or "run"
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


class WandbRunLogger(WandbLogger):
    """Log metrics and the full config to W&B, one W&B run per lorafit run directory.

    Args:
        project: W&B project; empty means ``$WANDB_PROJECT``, else ``lorafit``.
        name: Display name of the run; empty means the run directory's name.
        id: W&B run id; empty means one derived from the absolute run directory, so a resumed
            or requeued run continues the same W&B run. Set it to attach to another run.
        offline: Log to ``<run dir>/wandb`` only, without network (same as ``WANDB_MODE=offline``);
            upload later with ``wandb sync <run dir>/wandb/offline-run-*``.
        entity: W&B user or team; empty means your default entity.
        group: W&B group, e.g. to gather the runs of a sweep.
        tags: W&B tags.
        notes: A description shown with the run.
        save_dir: Directory for W&B's local files; empty means the run directory.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        id: str | None = None,
        offline: bool = False,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        save_dir: str | None = None,
    ):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise LorafitError(f"trainer.logger: W&B logging needs the wandb package: {INSTALL_HINT}") from None
        super().__init__(
            name=name,
            save_dir=save_dir,
            id=id,
            offline=offline,
            project=project or os.environ.get("WANDB_PROJECT") or "lorafit",
            entity=entity,
            group=group,
            tags=tags,
            notes=notes,
        )
        self._given = {"id": id, "name": name, "dir": save_dir}

    def bind_run_dir(self, run_dir: str | os.PathLike) -> None:
        """Fill in what depends on the run directory: id, display name and local directory.

        Called by ``lorafit fit`` before training starts; does nothing once the W&B run exists.
        """
        if self._experiment is not None:
            return
        run_dir = os.path.abspath(os.fspath(run_dir))
        if not self._given["id"]:
            self._id = self._wandb_init["id"] = stable_run_id(run_dir)
        if not self._given["name"]:
            self._name = self._wandb_init["name"] = os.path.basename(run_dir)
        if not self._given["dir"]:
            self._save_dir = self._wandb_init["dir"] = run_dir
        os.makedirs(self._save_dir, exist_ok=True)  # wandb.init needs the directory to exist
