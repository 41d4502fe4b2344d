"""What to do when training meets a NaN/Inf: detect it cheaply, say where and why in one line.

A diverged run must not overwrite the last good LoRA file. The module stops before the bad step
is applied (loss) or right after it (weights), and the exporter refuses NaN weights, so every file
on disk is one written before the problem.
"""

from __future__ import annotations

import logging

import torch

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.train")

LIKELY_CAUSES = ("Likely causes: a learning rate too high for the optimizer (model.learning_rate/unet_lr/"
                 "text_encoder_lr), fp16 overflow (use trainer.precision: bf16-mixed; keep model.vae_dtype: "
                 "float32 with fp16), or a broken image in the batch")


class NonFiniteLossError(LorafitError):
    """Training met a NaN/Inf loss (or weights) and stopped before exporting anything from it."""


def trainable_weights_finite(module: torch.nn.Module) -> bool:
    """True when every trainable weight of ``module`` is finite (one device sync, not one per tensor)."""
    params = [p.detach() for p in module.parameters() if p.requires_grad]
    return not params or bool(torch.isfinite(torch.stack([p.abs().max().float() for p in params])).all())


def batch_position(step: int, epoch: int, batch_idx: int, batch: dict) -> str:
    """``step 12 (epoch 1, batch 3, samples: a.png, b.png +2 more)``: where in training, which images."""
    keys = [str(k) for k in batch.get("keys", [])]
    shown = ", ".join(keys[:3]) + (f" +{len(keys) - 3} more" if len(keys) > 3 else "")
    return f"step {step} (epoch {epoch}, batch {batch_idx}, samples: {shown or 'unnamed'})"


def nonfinite_loss_error(loss: float, where: str) -> NonFiniteLossError:
    return NonFiniteLossError(f"loss is {loss} at {where}; stopped before any export of it. {LIKELY_CAUSES}; "
                              "model.nonfinite_loss: skip drops such batches instead")


def nonfinite_weights_error(where: str) -> NonFiniteLossError:
    return NonFiniteLossError(f"LoRA weights became NaN/Inf after {where}; stopped, nothing from it was exported. "
                              f"{LIKELY_CAUSES}")


class NonfiniteGuard:
    """The training module's NaN/Inf handling (a mixin of LoraDiffusionModule): ``model.nonfinite_loss``
    stops or skips on a bad loss; a bad weight after a step always stops."""

    def _position(self, batch: dict, batch_idx: int) -> str:
        return batch_position(self.global_step, self.current_epoch, batch_idx, batch)

    def _nonfinite_loss(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> None:
        if self.hparams.nonfinite_loss != "skip":
            raise nonfinite_loss_error(loss.item(), self._position(batch, batch_idx))
        self.skipped_nonfinite += 1
        log.warning("skipped a batch with loss %s at %s; %d skipped so far", loss.item(),
                    self._position(batch, batch_idx), self.skipped_nonfinite)
        self.log("loss/skipped_nonfinite", float(self.skipped_nonfinite), on_step=True, on_epoch=False,
                 batch_size=len(batch["captions"]))
        return None  # Lightning then skips backward and the optimizer step

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # A finite loss can still produce an overflowing update (LR far too high): stop before the
        # next step builds on it. LoraExport checks the same, so no NaN weights are written.
        if not trainable_weights_finite(self):
            raise nonfinite_weights_error(self._position(batch, batch_idx))
