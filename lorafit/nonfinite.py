"""What to do when training meets a NaN/Inf: detect it cheaply, say where and why in one line.

A diverged run must not overwrite the last good LoRA file. The module stops before the bad step
is applied (loss) or right after it (weights), and the exporter refuses NaN weights, so every file
on disk is one written before the problem.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError

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
