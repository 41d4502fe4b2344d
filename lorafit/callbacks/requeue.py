"""Checkpoint and requeue on SLURM's warning signal, at a step boundary all ranks agree on.

SLURM sends ``SIGUSR1`` some time before a job's end (``#SBATCH --signal=SIGUSR1@90``) or on
request (``scancel --signal=USR1 JOB``). Lightning's own auto-requeue (``SLURMEnvironment``)
saves the checkpoint *inside* the signal handler. That is wrong in two ways for exact resumes:
the handler runs between any two Python bytecodes, so the checkpoint can hold weights already
updated by a step the progress counters do not yet count (the resumed run applies it twice);
and under DDP the save ends in a barrier, a collective that the other ranks, interrupted at a
different point of their step, meet with a gradient all-reduce, which hangs or corrupts.

Here the handler only raises a flag. After each optimizer step the ranks sum their flags (one
tiny all-reduce on the device per step) and read the sum a step later through a pinned host copy
(lorafit/distributed/host_readback.py), so no step waits for the GPU; every rank reads the same sum at the
same step, so all save together, at the same clean point ModelCheckpoint's step checkpoints use,
one step after the signal. Rank 0 runs ``scontrol requeue``, and the processes exit (status 0; a
stop that nothing requeues, outside SLURM, exits 138 = 128 + SIGUSR1). The requeued
job resumes from ``hpc_ckpt_N.ckpt`` in the run directory (the name Lightning's SLURM resume looks
for; the sbatch templates pass the newest checkpoint explicitly).

``SIGTERM`` (``kill``, ``scancel``, ``docker stop``, a job manager ending the job, SLURM's
preemption before its ``SIGKILL``) takes the same path without the requeue: the checkpoint is
saved at the next step boundary, a line says where and how to resume, and the process exits with
status 143 (128 + SIGTERM, what a shell reports for a process the signal ended), so no job manager
mistakes the stop for a finished run. Lightning alone would stop at the next step without a
checkpoint and exit with status 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal as signal_module
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint

from lorafit.distributed.collectives import all_reduce_in_place, defer_lightning_sigterm_check
from lorafit.distributed.host_readback import HostReadback

log = logging.getLogger("lorafit.requeue")


class TrainingRequeued(SystemExit):
    """Raised on every rank after the checkpoint is saved; exits the process with status 0 when SLURM
    requeued the job, else with 128 + the signal's number (138 for SIGUSR1)."""


class TrainingTerminated(SystemExit):
    """Raised on every rank after the SIGTERM checkpoint is saved; exits the process with :data:`SIGTERM_EXIT`."""


SIGTERM_EXIT = 128 + signal_module.SIGTERM  # 143: what `kill`/`timeout` and shells report for a SIGTERM death


def next_hpc_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``hpc_ckpt_<N+1>.ckpt`` in ``run_dir``, N being the highest number already there (0 if none)."""
    run_dir = Path(run_dir)
    numbers = [
        int(m.group(1))
        for p in (run_dir.glob("hpc_ckpt_*.ckpt") if run_dir.is_dir() else [])
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for array jobs, else the job id."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(Checkpoint):
    """On ``signal``, save ``hpc_ckpt_N.ckpt`` after the current optimizer step, requeue the SLURM job, exit.

    Outside SLURM the checkpoint is saved and training stops; resume it with
    ``--ckpt_path <run dir>/hpc_ckpt_N.ckpt``.

    A ``Checkpoint`` subclass so that Lightning runs it after every other callback (it moves
    checkpoint callbacks to the end): the saved state then includes what they did at this step.

    Args:
        signal: Signal that asks for checkpoint + requeue: the one in ``#SBATCH --signal`` (SIGUSR1).
            Empty disables the handler.
        requeue: Run ``scontrol requeue $SLURM_JOB_ID`` after saving (under SLURM only).
        sigterm: On SIGTERM, save a resumable checkpoint at the next step boundary and exit with
            status 143 (no requeue). Off: Lightning's own handling (stop without a checkpoint, status 0).
    """

    def __init__(self, signal: str | None = "SIGUSR1", requeue: bool = True, sigterm: bool = True):
        self.signal = signal
        self.requeue = requeue
        self.sigterm = sigterm
        self.requested = False
        self.terminated = False
        self._save_at_epoch_end = False
        self._previous_handlers: dict[int, object] = {}
        # This rank's flags [requeue signal, SIGTERM] on the device, summed over ranks in place.
        self._flag: torch.Tensor | None = None
        self._agreed = HostReadback()
        self._agreed_terminate = False

    def _signum(self) -> int:
        name = self.signal.upper()
        return getattr(signal_module, name if name.startswith("SIG") else f"SIG{name}")

    def _on_signal(self, signum, frame) -> None:
        # Nothing else may happen here: see the module docstring.
        if signum == signal_module.SIGTERM:
            self.terminated = True
        else:
            self.requested = True

    @property
    def _listening(self) -> bool:
        return bool(self.signal) or self.sigterm

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        # Signals again: Lightning's own per-step SIGTERM check under DDP stalls each step (collectives.py).
        if stage == "fit":
            defer_lightning_sigterm_check(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        # After Lightning registered its own handlers (which would save inside the handler, or for
        # SIGTERM stop without saving): ours replace them for the training loop.
        signums = ([self._signum()] if self.signal else []) + ([signal_module.SIGTERM] if self.sigterm else [])
        for signum in signums:
            self._previous_handlers[signum] = signal_module.signal(signum, self._on_signal)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal_module.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._listening:
            return
        # Mid-accumulation the summed gradients are not in the checkpoint; wait for the step.
        accumulate = trainer.accumulate_grad_batches
        last_batch = batch_idx + 1 == trainer.num_training_batches
        if (batch_idx + 1) % accumulate and not last_batch:
            return
        # Every rank takes part in this reduction every step, and reads the previous step's sum
        # (the same on every rank), so all decide at the same step.
        if self._flag is None:
            self._flag = torch.zeros(2, device=pl_module.device)
        # Fills, not a copy from the host: nothing waits.
        self._flag[0].fill_(float(self.requested))
        self._flag[1].fill_(float(self.terminated))
        self._agreed.push(all_reduce_in_place(self._flag, "sum"))
        if not self._asked(keep=1):
            return
        if last_batch:
            # Lightning resumes a checkpoint taken after an epoch's last batch by skipping that
            # epoch's end hooks (its LoRA export, last.ckpt, epoch LR step); save after them instead.
            self._save_at_epoch_end = True
            return
        self._save_requeue_and_exit(trainer)

    def _asked(self, keep: int) -> bool:
        """Whether any rank got a signal by the step before the newest ``keep`` ones (all ranks agree)."""
        asked = False
        for (requeue, terminate), _ in self._agreed.collect(keep):
            asked = asked or requeue > 0 or terminate > 0
            self._agreed_terminate = self._agreed_terminate or terminate > 0
        return asked

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        # The epoch's last step decides now rather than a step later, in the next epoch. The same on
        # every rank: decided by the reductions above.
        if self._save_at_epoch_end or (self._listening and self._asked(keep=0)):
            self._save_requeue_and_exit(trainer)

    def _save_requeue_and_exit(self, trainer: pl.Trainer) -> None:
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)))
        trainer.save_checkpoint(path)
        if self._agreed_terminate:  # SIGTERM wins: the job is being ended, not rescheduled
            if trainer.is_global_zero:
                log.warning(
                    "SIGTERM: saved %s; stopping with exit status %d (resume with --ckpt_path %s)",
                    path,
                    SIGTERM_EXIT,
                    path,
                )
            raise TrainingTerminated(SIGTERM_EXIT)
        job = slurm_job_id()
        # Status 0 only when SLURM runs the job again: a stop that nothing resumes (no SLURM, requeue
        # off, scontrol failing) is not a finished run, so it exits 128 + the signal, as SIGTERM's does.
        stopped = 128 + self._signum()
        requeued = False
        if trainer.is_global_zero:
            if job and self.requeue:
                result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
                if result.returncode:
                    log.error(
                        "saved %s but `scontrol requeue %s` failed: %s; stopping with exit status %d",
                        path,
                        job,
                        result.stderr.strip(),
                        stopped,
                    )
                else:
                    log.info("saved %s and requeued SLURM job %s; it resumes from there", path, job)
                    requeued = True
            else:
                log.info("saved %s; stopping with exit status %d (resume with --ckpt_path %s)", path, stopped, path)
        raise TrainingRequeued(0 if trainer.strategy.broadcast(requeued) else stopped)
