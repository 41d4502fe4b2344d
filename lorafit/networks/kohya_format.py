"""kohya / LyCORIS (A1111, ComfyUI) network files: key names, both directions.

Keys are ``<stem>.<part>`` where the part names the tensor (``lora_down.weight``, ``lora_up.weight``
and ``dora_scale`` for LoRA/LoCon/DoRA; ``hada_w1_a``... for LoHa; ``lokr_w1``... for LoKr, see the
module-weight classes) plus ``<stem>.alpha``, and the stem is a prefix plus the module path with
dots turned into underscores:

- SD1/SD2 UNet: ``lora_unet_`` + the diffusers path (``lora_unet_down_blocks_0_attentions_0_...``).
- SDXL UNet: ``lora_unet_`` + the *original SGM* path (``lora_unet_input_blocks_4_1_...``); this is
  what A1111/ComfyUI/kohya expect, and what diffusers' ``convert_state_dict_to_kohya`` gets wrong.
- Text encoders: ``lora_te_`` (SD1/2) or ``lora_te1_`` (CLIP-L) / ``lora_te2_`` (OpenCLIP bigG) +
  the transformers-4 path, which starts with ``text_model_`` even though transformers 5 removed
  that level from ``named_modules()``.

Underscores make stems ambiguous to parse, so the reverse direction never parses: it builds the
forward name of every module of the real model and inverts that table.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraWeights, module_from_parts

_TE_PREFIX = {
    ("sd1", "text_encoder"): "lora_te",
    ("sd2", "text_encoder"): "lora_te",
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def _text_model_path(module: str) -> str:
    # Derive from the transformers-4 layout: ``text_model.encoder.layers.0...`` whatever the version.
    return module if module.startswith("text_model.") else f"text_model.{module}"


def kohya_stem(family: str, component: str, module: str, unet_config=None) -> str:
    """The kohya name stem of ``module`` of ``component`` in a ``family`` model."""
    if component == "unet":
        if family == "sdxl":
            from lorafit.families.original_layout import unet_module_to_original

            module = unet_module_to_original(module, unet_config)
        return "lora_unet_" + module.replace(".", "_")
    prefix = _TE_PREFIX.get((family, component))
    if prefix is None:
        raise LorafitError(f"{family} has no component {component!r} for kohya names")
    return f"{prefix}_" + _text_model_path(module).replace(".", "_")


def kohya_name_table(family: str, components: dict[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
    """stem -> (component, module) for every Linear/Conv2d module a LoRA could sit on.

    PEFT wraps targeted layers (``to_q`` becomes a LoraLayer whose ``base_layer`` is the Linear;
    several adapter types on one layer nest), so ``.base_layer`` suffixes map back to the outermost
    wrapper's name.
    """
    table: dict[str, tuple[str, str]] = {}
    for component, model in components.items():
        unet_config = model.config if component == "unet" else None
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in name:
                continue
            while name.endswith(".base_layer"):
                name = name.removesuffix(".base_layer")
            table[kohya_stem(family, component, name, unet_config)] = (component, name)
    return table


def to_kohya_state_dict(family: str, weights: LoraWeights, unet_config=None) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors for ``weights``; ``.alpha`` is the true alpha as a float32 scalar."""
    out: dict[str, torch.Tensor] = {}
    for component, modules in weights.items():
        for module, weights_of_module in modules.items():
            stem = kohya_stem(family, component, module, unet_config)
            for part, tensor in weights_of_module.parts().items():
                out[f"{stem}.{part}"] = tensor.contiguous()
            out[f"{stem}.alpha"] = torch.tensor(weights_of_module.alpha, dtype=torch.float32)
    return out


def is_kohya_state_dict(state_dict: dict) -> bool:
    return bool(state_dict) and all(key.startswith(KOHYA_PREFIXES) for key in state_dict)


def from_kohya_state_dict(
    state_dict: dict[str, torch.Tensor], table: dict[str, tuple[str, str]], source: str = "LoRA file"
) -> LoraWeights:
    """Invert :func:`to_kohya_state_dict` using a :func:`kohya_name_table` of the target model.

    Unknown stems and parts no supported type reads are an error naming the first one: silently
    dropping part of a network is how "my LoRA does nothing" bugs start.
    """
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, {})[part] = tensor
    weights: LoraWeights = {}
    for stem, parts in sorted(stems.items()):
        if stem not in table:
            raise LorafitError(f"{source}: key {stem} names no module of this base model (wrong family or base?)")
        component, module = table[stem]
        weights.setdefault(component, {})[module] = module_from_parts(parts, f"{source}: {stem}")
    return weights
