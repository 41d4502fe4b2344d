"""What to do when training meets a NaN/Inf: detect it without stalling the GPU, say where in one line.

A diverged run must not overwrite the last good LoRA file. After every step the loss and the norm
of the trainable weights go to the host through
:class:`lorafit.distributed.host_readback.HostReadback` and are checked one step later
(:class:`NonfiniteGuard`, a callback), so the check costs no host sync (a NaN weight makes the
next loss NaN anyway). Before anything is written (LoRA export, checkpoint) and at the end of each epoch the
check waits for the latest values, so no file ever holds a non-finite weight, and the error names
the step and images where it started. ``model.nonfinite_loss: skip`` has to decide before the
backward pass, so it reads each loss at once (one host sync per step).
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


def trainable_weights_finite(module: torch.nn.Module) -> bool:
    """True when every trainable weight of ``module`` is finite (one host sync)."""
    return bool(torch.isfinite(trainable_weights_norm(module)))


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
    a bad weight after a step always stops (see module docstring).

    A callback (the module adds it through ``configure_callbacks``) that queues each step's checks
    after the step and decides a step later; the module asks it to wait before anything is written
    (:meth:`ensure_finite`) and, in ``skip`` mode, whether a loss may go on (:meth:`watch_loss`).

    Args:
        mode: ``stop`` or ``skip`` (``model.nonfinite_loss``).
    """

    def __init__(self, mode: str = "stop"):
        self.mode = mode
        self.skipped = 0  # batches skipped in ``skip`` mode; saved in checkpoints by the module
        self._readback = HostReadback()
        self._pending_loss: tuple[torch.Tensor, str] | None = None
        # The trainable weights, listed once per epoch: walking every parameter of the frozen base at
        # each step cost more than the norm itself (toy demo: 8 of 10 ms a step).
        self._weights: list[torch.Tensor] | None = None
        self.last_loss: float | None = None  # the newest checked loss, for the progress bar

    @staticmethod
    def _position(module, batch: dict | None = None, batch_idx: int | None = None) -> str:
        return batch_position(module.global_step, module.current_epoch, batch_idx, batch)

    def watch_loss(self, module, loss: torch.Tensor, batch: dict, batch_idx: int) -> bool:
        """Whether the step goes on with ``loss``: ``stop`` queues it for a check a step later,
        ``skip`` reads it now and drops the batch when it is not finite."""
        self._pending_loss = (loss.detach().float(), self._position(module, batch, batch_idx))
        if self.mode != "skip" or torch.isfinite(loss):
            return True
        self._pending_loss = None
        self.skipped += 1
        log.warning(
            "skipped a batch with loss %s at %s; %d skipped so far",
            loss.item(),
            self._position(module, batch, batch_idx),
            self.skipped,
        )
        module.log(
            "loss/skipped_nonfinite",
            torch.tensor(float(self.skipped)),
            on_step=True,
            on_epoch=False,
            batch_size=len(batch["captions"]),
        )
        return False  # training_step then returns None: Lightning skips backward and the optimizer step

    def _queue_checks(self, module, batch: dict | None = None, batch_idx: int | None = None) -> None:
        """Send this step's loss and the weights' norm to the host (no wait)."""
        if self._weights is None:
            self._weights = trainable_weights(module)
        norm = trainable_weights_norm(module, self._weights).float()
        # No loss this step (a skipped batch, or a check outside a step): a placeholder, not checked.
        loss, loss_position = self._pending_loss or (torch.zeros((), device=norm.device), None)
        self._pending_loss = None
        self._readback.push(torch.stack([loss, norm]), (loss_position, self._position(module, batch, batch_idx)))

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
        # Queue this step's checks and run the previous step's. A finite loss can still produce an
        # overflowing update (LR far too high); the next step's check, or the one before any file is
        # written, catches it. The previous step's loss, on the host now, is what the progress bar
        # shows (LorafitProgressBar reads it here: a `self.log` of it cost about a millisecond a step).
        self._queue_checks(pl_module, batch, batch_idx)
        previous_loss = self._raise_on_nonfinite(keep=1)
        if previous_loss is not None:
            self.last_loss = previous_loss

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._weights = None  # list them again: a method may have frozen or unfrozen some

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ensure_finite(pl_module)

    def ensure_finite(self, module, batch: dict | None = None, batch_idx: int | None = None) -> None:
        """Wait for every check up to now (before a file is written): raise NonFiniteLossError on NaN/Inf."""
        self._queue_checks(module, batch, batch_idx)
        self._raise_on_nonfinite(keep=0)
