"""Attach network adapters (PEFT) to the UNet and, optionally, the text encoders.

Which modules and which PEFT config are decided in ``presets.py`` and ``network_types.py``; this
module injects the config and makes exactly the adapter's weights trainable.

Alpha convention: the LoRA update is ``W + (alpha / rank) * up @ down``, as in PEFT, kohya and
A1111. lorafit's default is ``alpha = rank`` (scale 1, the diffusers/SimpleTuner convention);
kohya and OneTrainer default to ``alpha = 1`` (scale 1/rank), which needs a learning rate about
``rank`` times higher for the same step size. Whatever alpha is chosen is written into every
exported file (kohya ``.alpha`` tensors, diffusers ``lora_adapter_metadata``), so it survives a reload.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError

ADAPTER_NAME = "default"
# The UNet's attention projections (the `attn` preset), for an explicit `unet_target_modules` list.
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# kohya trains CLIP's attention and MLP linears (CLIPAttention + CLIPMLP) in the text encoders.
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

Targets = list[str] | str


def lora_config(rank: int, alpha: float | None, targets: Targets, key: str):
    """A PEFT ``LoraConfig``; ``targets`` is a list of module-name suffixes or one full-match regex."""
    from peft import LoraConfig

    if rank < 1:
        raise LorafitError(f"{key}: rank must be >= 1, got {rank}")
    if not targets:
        raise LorafitError(f"{key}: target module list is empty; name at least one module (e.g. to_q)")
    return LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=targets,
        init_lora_weights=True,  # down: Kaiming-uniform, up: zeros, so training starts at the base model
    )


# PEFT's parameter-name prefixes of the network kinds lorafit trains (LoRA/DoRA, LoHa, LoKr).
_ADAPTER_PREFIXES = (".lora_", ".hada_", ".lokr_")


def add_network(model: torch.nn.Module, config, key: str) -> int:
    """Inject ``config`` into ``model`` (frozen base), return the number of adapted modules.

    Fails with one line when the targets match nothing, the usual result of a typo in a regex.
    """
    from peft import inject_adapter_in_model

    from lorafit.networks.peft_layers import adapter_layers

    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as error:
        raise LorafitError(
            f"{key}: {config.target_modules!r} matches no module of {type(model).__name__} ({error})"
        ) from None
    for name, param in model.named_parameters():
        if any(prefix in name for prefix in _ADAPTER_PREFIXES):
            # Adapter weights train in float32 even over bf16/fp16 base weights: fp16 updates underflow.
            param.data = param.data.float()
            param.requires_grad_(True)
    return len(adapter_layers(model, ADAPTER_NAME))


add_lora = add_network  # the name tests and older code use


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module of ``model`` that carries our adapter, by its name in ``model``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    }


def attach_network(
    model: torch.nn.Module, spec, base_targets, include: list[str] | None, exclude: list[str] | None, key: str
) -> int:
    """Select ``model``'s modules (``presets.select_modules``) and inject ``spec``'s network on them."""
    from lorafit.networks.network_types import network_config
    from lorafit.networks.presets import select_modules

    targets = select_modules(model, base_targets, include, exclude, key)
    count = add_network(model, network_config(spec, targets), key)
    if spec.network_type == "dora" and spec.dora_axis == "input":
        from lorafit.networks.input_dora import add_input_magnitudes

        add_input_magnitudes(model, ADAPTER_NAME)
    return count
