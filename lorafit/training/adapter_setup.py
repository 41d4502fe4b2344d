"""Where a run's adapters go: the denoiser's modules (a preset or the user's targets) and the text
encoders that train, with the adapters on text layers the conditioning never reads frozen."""

from __future__ import annotations

import torch

from lorafit.families.family import BaseModel, Family
from lorafit.networks.adapters import attach_network
from lorafit.training.config import ConditioningConfig, NetworkConfig
from lorafit.training.text_encoders import freeze_unread_text_lora


def attach_adapters(
    base: BaseModel,
    family: Family,
    network: NetworkConfig,
    rates: dict[str, float],
    trained_text_encoders: dict[str, torch.nn.Module],
    conditioning: ConditioningConfig,
) -> None:
    """Attach ``network``'s adapter to the denoiser (when its learning rate in ``rates`` is above 0) and
    to each of ``trained_text_encoders``; parts with learning rate 0 get none."""
    spec = network.adapter_spec()
    if rates[family.denoiser_component] > 0:
        if network.targets is not None:
            targets, key = network.targets, "model.network.targets"
        else:
            targets = family.preset_modules(base.denoiser, network.preset, with_conv_blocks=network.type == "locon")
            key = "model.network.preset"
        attach_network(base.denoiser, spec, targets, network.include, network.exclude, key)
    for encoder in trained_text_encoders.values():
        attach_network(
            encoder,
            spec,
            network.text_encoder_targets,
            network.include,
            network.exclude,
            "model.network.text_encoder_targets",
        )
    # Left trainable, LoRA that cannot reach the loss stops DDP ("parameters that were not used in
    # producing the loss"); see freeze_unread_text_lora.
    for index, encoder in enumerate(base.text_encoders):
        if any(encoder is trained for trained in trained_text_encoders.values()):
            used = family.text_layers_used(index, encoder.config.num_hidden_layers, conditioning)
            freeze_unread_text_lora(encoder, used)
