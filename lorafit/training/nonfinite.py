"""What to do when training meets a NaN/Inf: detect it without stalling the GPU, say where in one line.

A diverged run must not overwrite the last good LoRA file. Two ways to watch, one rule: a weight
gone NaN/Inf makes the next loss NaN/Inf, so the loss is the per-step signal and the weights are
checked when a loss goes bad and before anything is written.

* **On an accelerator, and under DDP** (``stop`` mode), reading a loss at once would stall the device
  every step. So after every step the loss and the norm of the trainable weights go to the host
  through :class:`lorafit.distributed.host_readback.HostReadback` and are checked one step later; the
  norm is a few multi-tensor kernels there.
* **In one CPU process, and in ``skip`` mode,** each loss is read before its backward pass (on the CPU
  there is nothing to stall; ``skip`` has to decide then; under DDP the deferred way above is kept, so
  every rank stops at the same step). A bad loss stops the run before its update, and the
  weights are checked then to say whether the previous update broke them. No weight norm runs per
  step: on the CPU it is a loop over every LoRA tensor (0.55 ms a step on the toy demo, issue 19).

Before anything is written (LoRA export, checkpoint) and at the end of each epoch the check waits for
the latest values and the weights, so no file ever holds a non-finite weight, and the error names the
step and images where it started.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch

from lorafit.distributed.host_readback import HostReadback
from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.train")

LIKELY_CAUSES = (
    "Likely causes: a learning rate too high for the optimizer (model.learning_rate/unet_lr/"
    "text_encoder_lr), fp16 overflow (use trainer.precision: bf16-mixed; keep model.vae_dtype: "
    "float32 with fp16), or a broken image in the batch"
)


class NonFiniteLossError(LorafitError):
    """Training met a NaN/Inf loss (or weights) and stopped before exporting anything from it."""


def trainable_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable weights of ``module``, detached (a walk over every parameter of the base too)."""
    return [p.detach() for p in module.parameters() if p.requires_grad]


def trainable_weights_norm(module: torch.nn.Module, params: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The 2-norm of all trainable weights of ``module`` (or of ``params``, a list from
    :func:`trainable_weights`) as a device tensor (no host sync): NaN/Inf exactly when a weight is (or
    when weights near 1e19 overflow it, which is divergence too). PyTorch's multi-tensor norm makes
    this a few kernels, not one per weight."""
    params = trainable_weights(module) if params is None else params
    if not params:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(params, error_if_nonfinite=False)


def trainable_weights_finite(module: torch.nn.Module, params: list[torch.Tensor] | None = None) -> bool:
    """True when every trainable weight of ``module`` (or of ``params``) is finite (one host sync)."""
    return bool(torch.isfinite(trainable_weights_norm(module, params)))


def batch_position(step: int, epoch: int, batch_idx: int | None = None, batch: dict | None = None) -> str:
    """``step 12 (epoch 1, batch 3, samples: a.png, b.png +2 more)``: where in training, which images."""
    if batch is None:
        return f"step {step} (epoch {epoch})"
    keys = [str(k) for k in batch.get("keys", [])]
    shown = ", ".join(keys[:3]) + (f" +{len(keys) - 3} more" if len(keys) > 3 else "")
    return f"step {step} (epoch {epoch}, batch {batch_idx}, samples: {shown or 'unnamed'})"


def nonfinite_loss_error(loss: float, where: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"loss is {loss} at {where}; stopped before any export of it. {LIKELY_CAUSES}; "
        "model.nonfinite_loss: skip drops such batches instead"
    )


def nonfinite_weights_error(where: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"LoRA weights became NaN/Inf after {where}; stopped, nothing from it was exported. {LIKELY_CAUSES}"
    )


class NonfiniteGuard(pl.Callback):
    """The training module's NaN/Inf handling: ``model.nonfinite_loss`` stops or skips on a bad loss;
    a bad weight always stops (see module docstring).

    A callback (the module adds it through ``configure_callbacks``). The module hands it each loss
    before the backward pass (:meth:`watch_loss`) and asks it to wait before anything is written
    (:meth:`ensure_finite`).

    Args:
        mode: ``stop`` or ``skip`` (``model.nonfinite_loss``).
        defer: check each step's loss one step later (no device stall) rather than at once; ``None``
            defers when the loss is on an accelerator in ``stop`` mode.
    """

    def __init__(self, mode: str = "stop", defer: bool | None = None):
        self.mode = mode
        self.defer = defer
        self.skipped = 0  # batches skipped in ``skip`` mode; saved in checkpoints by the module
        self._readback = HostReadback()
        self._pending_loss: tuple[torch.Tensor, str] | None = None
        # Where the newest step ran: the update that a NaN weight found later came from.
        self._step_position: str | None = None
        # The trainable weights, listed once per epoch: walking every parameter of the frozen base at
        # each step cost more than the norm itself (toy demo: 8 of 10 ms a step).
        self._weights: list[torch.Tensor] | None = None
        self.last_loss: float | None = None  # the newest checked loss, for the progress bar

    @staticmethod
    def _position(module, batch: dict | None = None, batch_idx: int | None = None) -> str:
        return batch_position(module.global_step, module.current_epoch, batch_idx, batch)

    def _deferred(self, module, loss: torch.Tensor) -> bool:
        if self.mode == "skip":
            return False
        if self.defer is not None:
            return self.defer
        # At once only in one CPU process. Under DDP a rank that stopped before its backward pass
        # would leave the others waiting in the gradient all-reduce; the deferred checks run after
        # it, on every rank, and the weights (the same on all ranks) stop them at the same step.
        return loss.device.type != "cpu" or module.trainer.world_size > 1

    def _trainable_weights(self, module) -> list[torch.Tensor]:
        if self._weights is None:
            self._weights = trainable_weights(module)
        return self._weights

    def watch_loss(self, module, loss: torch.Tensor, batch: dict, batch_idx: int) -> bool:
        """Whether the step goes on with ``loss`` (before its backward pass): deferred, it is queued
        for a check a step later; otherwise it is read now, and a bad one stops the run (``stop``)
        or drops the batch (``skip``), after a check of the weights that says whether the previous
        update broke them."""
        position = self._position(module, batch, batch_idx)
        previous_step, self._step_position = self._step_position, position
        if self._deferred(module, loss):
            self._pending_loss = (loss.detach().float(), position)
            return True
        value = loss.item()  # on the CPU: no wait; in skip mode: the one host sync it costs a step
        if math.isfinite(value):
            self.last_loss = value
            return True
        if previous_step is not None and not trainable_weights_finite(module, self._trainable_weights(module)):
            raise nonfinite_weights_error(previous_step)
        if self.mode == "stop":
            raise nonfinite_loss_error(value, position)
        self.skipped += 1
        log.warning("skipped a batch with loss %s at %s; %d skipped so far", value, position, self.skipped)
        module.log(
            "loss/skipped_nonfinite",
            torch.tensor(float(self.skipped)),
            on_step=True,
            on_epoch=False,
            batch_size=len(batch["captions"]),
        )
        return False  # training_step then returns None: Lightning skips backward and the optimizer step

    def _queue_checks(self, module) -> None:
        """Send the pending loss and the weights' norm to the host (no wait)."""
        norm = trainable_weights_norm(module, self._trainable_weights(module)).float()
        # No loss queued (read at once, a skipped batch, or a check outside a step): a placeholder, not checked.
        loss, loss_position = self._pending_loss or (torch.zeros((), device=norm.device), None)
        self._pending_loss = None
        weights_position = self._step_position or self._position(module)
        self._readback.push(torch.stack([loss, norm]), (loss_position, weights_position))

    def _raise_on_nonfinite(self, keep: int) -> float | None:
        """Check every queued step but the newest ``keep``; returns the newest checked loss."""
        newest = None
        for (loss, norm), (loss_position, weights_position) in self._readback.collect(keep):
            if loss_position is not None and not math.isfinite(loss):
                self._readback.clear()
                raise nonfinite_loss_error(loss, loss_position)
            if not math.isfinite(norm):
                self._readback.clear()
                raise nonfinite_weights_error(weights_position)
            newest = loss if loss_position is not None else newest
        return newest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict, batch_idx: int) -> None:
        if self._pending_loss is None:
            return  # read at once (nothing queued), or a skipped batch
        # Queue this step's checks and run the previous step's. A finite loss can still produce an
        # overflowing update (LR far too high); the next step's check, or the one before any file is
        # written, catches it. The previous step's loss, on the host now, is what the progress bar
        # shows (LorafitProgressBar reads it here: a `self.log` of it cost about a millisecond a step).
        self._queue_checks(pl_module)
        previous_loss = self._raise_on_nonfinite(keep=1)
        if previous_loss is not None:
            self.last_loss = previous_loss

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._weights = None  # list them again: a method may have frozen or unfrozen some

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ensure_finite(pl_module)

    def ensure_finite(self, module) -> None:
        """Wait for every check up to now and check the weights (before a file is written): raise
        NonFiniteLossError on NaN/Inf."""
        self._queue_checks(module)
        self._raise_on_nonfinite(keep=0)
