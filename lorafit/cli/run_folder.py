"""A refused start leaves the run folder as it found it.

Some resume checks need the built network (the family of the base model, which parts carry a LoRA,
the shape of every LoRA weight), so they run when Lightning loads the checkpoint, inside
``trainer.fit``. By then Lightning has already started the loggers (``_call_setup_hook`` creates the
experiments: a new ``lightning_logs/version_N`` with an event file, a W&B offline-run folder), and a
refused resume left those behind in the run it refused to touch. lorafit's own writes wait for the
checks (config.yaml: lorafit/cli/run_config.py; LoRA files and checkpoints come from training).
What the start created before a check refused it is removed again here; nothing that existed
before is ever touched, and once training has started nothing is removed.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("lorafit.cli")


def paths_under(root: Path) -> set[Path]:
    """Every file and folder under ``root`` (empty when it does not exist)."""
    return set(root.rglob("*")) if root.is_dir() else set()


class RefusedStartCleanup:
    """Records the run folder before ``fit``/``validate`` and removes what a refused start added.

    ``started`` is asked at the end: a start counts as refused only while it returns False (lorafit
    passes "the run's config.yaml has been written", which happens once every check has passed).
    """

    def __init__(self) -> None:
        self.root: Path | None = None
        self.existing: set[Path] = set()
        self.root_existed = False
        self.started: Callable[[], bool] = lambda: True

    def record(self, run_dir: str, started: Callable[[], bool]) -> None:
        """Call on the process that owns the run folder (rank 0) right before the trainer starts."""
        self.root = Path(run_dir)
        self.root_existed = self.root.exists()
        self.existing = paths_under(self.root)
        self.started = started

    def undo(self) -> None:
        """Remove the files and folders that appeared under the run folder since :meth:`record`."""
        if self.root is None or self.started():
            return
        if not self.root_existed:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        added = sorted(paths_under(self.root) - self.existing, key=lambda p: len(p.parts), reverse=True)
        for path in added:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if added:
            log.debug("refused start: removed %d new path(s) under %s", len(added), self.root)


def record_run_folder(cli) -> None:
    """What the run folder holds before the trainer starts, so a refused start can leave it so."""
    from lightning.pytorch.cli import SaveConfigCallback

    trainer = cli.trainer
    if cli.config[cli.subcommand].get("ckpt_path"):
        # Resuming in place rewrites checkpoints/last.ckpt by design (LAST_CHECKPOINT); a fresh run in
        # an old run folder still gets Lightning's warning that it overwrites a checkpoint.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.")
    if trainer.is_global_zero:
        saved = [c for c in trainer.callbacks if isinstance(c, SaveConfigCallback)]
        cli.refused_start.record(trainer.default_root_dir, started=lambda: any(c.already_saved for c in saved))
