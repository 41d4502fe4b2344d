"""The trainer LightningCLI built, adjusted to lorafit's callbacks and to the flags a user set.

Imported only when ``fit``/``validate`` run (Lightning is imported inside the functions anyway).
"""

from __future__ import annotations

import logging

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.cli")


def honour_disabled_checkpointing(trainer, ckpt_path: str | None) -> None:
    """``trainer.enable_checkpointing: false``: no checkpoint files, and the user is told resume is off.

    Lightning refuses the flag when a checkpoint callback is configured, and lorafit always
    configures two (``checkpoint``: last.ckpt, ``requeue``: the SLURM save). The trainer is built
    with checkpointing on and both are taken out here, so nothing writes a checkpoint.
    """
    from lightning.pytorch.callbacks import Checkpoint

    if ckpt_path == "last":  # Lightning would find no checkpoint callback and start over, with a warning
        raise LorafitError(
            "--ckpt_path last looks for the run's checkpoints/last.ckpt, which trainer.enable_checkpointing: "
            "false does not keep; give the checkpoint file, or drop enable_checkpointing: false"
        )

    trainer.callbacks = [callback for callback in trainer.callbacks if not isinstance(callback, Checkpoint)]
    log.info(
        "trainer.enable_checkpointing is false: no checkpoints (last.ckpt, SLURM requeue), so this run cannot "
        "be resumed with --ckpt_path; the LoRA files are exported as usual"
    )


def use_lorafit_progress_bar(trainer, configured_callbacks) -> None:
    """Lightning's default bar -> lorafit's (epochs from 1, the whole run's time left); a configured bar stays."""
    from lightning.pytorch.callbacks import ProgressBar

    from lorafit.callbacks.progress import LorafitProgressBar

    entries = configured_callbacks if isinstance(configured_callbacks, list) else [configured_callbacks]
    if any("ProgressBar" in str(getattr(entry, "class_path", entry)) for entry in entries if entry):
        return
    trainer.callbacks = [
        LorafitProgressBar() if isinstance(callback, ProgressBar) else callback for callback in trainer.callbacks
    ]


def keep_config_out_of_lightning_hparams(*components) -> None:
    """The loggers get the whole run config once (lorafit/cli/run_config.py), not Lightning's partial copy.

    Lightning logs the module's and data module's hyperparameters itself when their
    ``_log_hyperparams`` is set (``save_hyperparameters(logger=True)``, the default); that copy is
    flattened, lacks the trainer and callback settings and comes with a placeholder ``hp_metric``.
    Fenced in tests/test_lightning_fences.py.
    """
    for component in components:
        if component is not None:
            component._log_hyperparams = False
