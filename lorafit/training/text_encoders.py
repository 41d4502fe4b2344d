"""Text-encoder LoRA that cannot reach the loss is frozen, so DDP never waits for its gradient.

The family's conditioning reads a hidden state before the encoder's last layer (SDXL's first
encoder, ``clip_skip``): adapters on the layers after it get no gradient, and DDP stops with
"parameters that were not used in producing the loss" when they stay trainable.
"""

from __future__ import annotations

import re

import torch

from lorafit.networks.adapters import ADAPTER_NAME

_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def freeze_unread_text_lora(encoder: torch.nn.Module, used_layers: int) -> None:
    """Freeze the adapters on the text-encoder layers after the first ``used_layers`` (those the
    family's conditioning reads, :meth:`~lorafit.families.family.Family.text_layers_used`).

    They cannot affect the loss (SDXL's first encoder skips its last layer, as does clip_skip), so
    they never get a gradient. They stay in the exported files at their initial, no-op values.
    """
    for name, parameter in encoder.named_parameters():
        match = _TEXT_LAYER.search(name)
        # Every network type's weights carry the adapter name (lora_A.default, hada_w1_a.default, ...).
        if f".{ADAPTER_NAME}" in name and match and int(match.group(1)) >= used_layers:
            parameter.requires_grad_(False)
