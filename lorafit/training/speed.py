"""Speed and memory settings of the models a training module holds.

``gradient_checkpointing`` trades one extra forward pass for most of the activation memory;
``channels_last`` stores the UNet's convolution weights (and so its activations) channels-last,
the layout tensor-core convolutions run fastest in; ``compile_unet`` hands the UNet to
``torch.compile``. tools/bench.py measures each (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def enable_gradient_checkpointing(unet: torch.nn.Module, trained_text_encoders: Iterable[torch.nn.Module]) -> None:
    """Recompute activations in the backward pass of the UNet and of the text encoders that train."""
    # Even with a frozen UNet, the text encoders' gradients flow back through it.
    unet.enable_gradient_checkpointing()
    for encoder in trained_text_encoders:
        # Non-reentrant: the frozen embeddings need no grad, and reentrant checkpointing would
        # then drop the LoRA gradients inside each layer.
        if hasattr(encoder, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers checkpoints only in train mode; CLIP has no dropout, so nothing else changes.
        encoder.train()


def apply_speed_settings(
    unet: torch.nn.Module,
    trained_text_encoders: Iterable[torch.nn.Module],
    gradient_checkpointing: bool,
    channels_last: bool,
    compile_unet: bool,
) -> None:
    """Apply the module's speed settings, after the adapters are attached (they are part of the UNet)."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(unet, trained_text_encoders)
    if channels_last:
        # In place, so parameter names and identities stay; the optimizer's state follows each
        # weight's layout, and exported files are made contiguous (networks/peft_layers.py).
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()  # in place: parameter names (checkpoints, exports) stay the same
