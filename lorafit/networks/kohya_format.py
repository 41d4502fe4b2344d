"""kohya / LyCORIS (A1111, ComfyUI, Forge) network files: key names, both directions, per family.

Keys are ``<stem>.<part>`` where the part names the tensor (``lora_down.weight``, ``lora_up.weight``
and ``dora_scale`` for LoRA/LoCon/DoRA; ``hada_w1_a``... for LoHa; ``lokr_w1``... for LoKr, see the
module-weight classes) plus ``<stem>.alpha``, and the stem is a prefix plus a module path with dots
turned into underscores. The family decides the names (:meth:`Family.kohya_stem`):

- SD1/SD2 UNet: ``lora_unet_`` + the diffusers path (``lora_unet_down_blocks_0_attentions_0_...``).
- SDXL UNet: ``lora_unet_`` + the *original SGM* path (``lora_unet_input_blocks_4_1_...``); this is
  what A1111/ComfyUI/kohya expect, and what diffusers' ``convert_state_dict_to_kohya`` gets wrong.
  Reading, the UNet families also take the names ComfyUI maps (diffusers paths, LDM paths, ``lycoris_``).
- Flux transformer: ``lora_unet_`` + BFL's path, where some modules are fused
  (``lora_unet_double_blocks_0_img_attn_qkv`` = ``to_q``/``to_k``/``to_v``): LoRA/DoRA are joined
  and split exactly (:mod:`lorafit.networks.fused_lora`); LoHa/LoKr and DoRA per input channel,
  which cannot be fused, are written per diffusers module as ``lycoris_`` + path (SimpleTuner's
  LyCORIS layout, which ComfyUI maps onto the fused weights). OneTrainer's ``lora_transformer_`` + path is read too.
- Text encoders: ``lora_te_`` (SD1/2) or ``lora_te1_`` (CLIP-L) / ``lora_te2_`` (OpenCLIP bigG; Flux's T5) /
  ``lora_te3_`` (SD3's T5, read only) + the transformers path; CLIP's starts with ``text_model_`` even
  though transformers 5 removed that level from ``named_modules()``.

Underscores make stems ambiguous to parse, so the reverse direction never parses: it builds the
forward name of every module of the real model and inverts that table.
"""

from __future__ import annotations

import contextlib

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import KohyaModule
from lorafit.families.registry import get_family
from lorafit.networks.fused_lora import join, split
from lorafit.networks.lora_weights import LoraModuleWeights, LoraWeights, module_from_parts
from lorafit.networks.model_fit import adaptable_layers

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")


def kohya_stem(family: str, component: str, module: str, denoiser_config=None) -> str:
    """The kohya name stem of ``module`` of ``component`` in a ``family`` model (1:1 modules)."""
    return get_family(family).kohya_stem(component, module, denoiser_config)


class KohyaTable(dict):
    """stem -> (component, module) for every 1:1-named module, plus ``fused``: stem -> (component,
    :class:`KohyaModule`) for the family's modules that are fused or reordered in its kohya layout."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family
        self.fused: dict[str, tuple[str, KohyaModule]] = {}


def kohya_name_table(family: str, components: dict[str, torch.nn.Module]) -> KohyaTable:
    """The name table of a ``family`` model's ``components`` (see :class:`KohyaTable`)."""
    spec = get_family(family)
    table = KohyaTable(family)
    for component, model in components.items():
        config = model.config if component == spec.denoiser_component else None
        layout = spec.kohya_layout(config) if config is not None else None
        names = list(adaptable_layers(model))
        if layout is not None:
            table.fused.update({stem: (component, module) for stem, module in layout.items()})
            # Other trainers name the same modules by their diffusers paths.
            for alias in spec.kohya_aliases:
                table.update({f"{alias}_{name.replace('.', '_')}": (component, name) for name in names})
            continue
        if component not in spec.kohya_prefixes:  # no kohya names: an LLM text encoder nobody trains LoRAs for
            continue
        for name in names:
            table[spec.kohya_stem(component, name, config)] = (component, name)
        if component == "unet":
            for stem, name in _unet_aliases(names, config).items():
                table.setdefault(stem, (component, name))  # the family's own names win
    return table


def _unet_aliases(names: list[str], config) -> dict[str, str]:
    """Other names ComfyUI maps onto the same UNet modules (``comfy/lora.py``, ``model_lora_keys_unet``).

    ``lora_unet_`` + the diffusers path (what diffusers' ``convert_state_dict_to_kohya`` writes for
    SDXL), ``lora_unet_`` + the original LDM path (SD1/SD2 files named like SDXL's) and SimpleTuner's
    LyCORIS ``lycoris_`` + the diffusers path.
    """
    from lorafit.families.original_layout import unet_module_to_original

    aliases = {}
    for name in names:
        flat = name.replace(".", "_")
        aliases[f"lora_unet_{flat}"] = aliases[f"lycoris_{flat}"] = name
        with contextlib.suppress(LorafitError):  # a module the original layout does not have
            aliases["lora_unet_" + unet_module_to_original(name, config).replace(".", "_")] = name
    return aliases


def to_kohya_state_dict(
    family: str, weights: LoraWeights, denoiser_config=None, denoiser: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors for ``weights``; ``.alpha`` is the true alpha as a float32 scalar.

    ``denoiser`` (the live model) supplies base weights where a fused DoRA module needs them.
    """
    spec = get_family(family)
    out: dict[str, torch.Tensor] = {}

    def write(stem: str, module_weights) -> None:
        for part, tensor in module_weights.parts().items():
            out[f"{stem}.{part}"] = tensor.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(module_weights.alpha, dtype=torch.float32)

    for component, modules in weights.items():
        layout = spec.kohya_layout(denoiser_config) if component == spec.denoiser_component else None
        if layout is None:
            for module, module_weights in modules.items():
                write(spec.kohya_stem(component, module, denoiser_config), module_weights)
            continue
        # LoHa/LoKr and DoRA per input channel cannot be fused (their update is no low-rank product, or
        # each part's norm is its own): per diffusers module under SimpleTuner's LyCORIS names, which
        # ComfyUI maps onto slices of the fused weights.
        lora = {m: w for m, w in modules.items() if isinstance(w, LoraModuleWeights) and w.dora_axis != 1}
        for module, module_weights in modules.items():
            if module not in lora:
                write(f"lycoris_{module.replace('.', '_')}", module_weights)
        covered = set()
        for stem, kohya_module in layout.items():
            parts = [lora.get(name) for name, _ in kohya_module.parts]
            if any(p is not None for p in parts):
                write(stem, join(kohya_module, parts, f"{family} {stem}", _base_weights(denoiser)))
                covered |= {name for name, _ in kohya_module.parts}
        missing = sorted(set(lora) - covered)
        if missing:  # never drop part of a network silently
            raise LorafitError(f"{family} module {missing[0]} has no name in the kohya layout ({len(missing)} such)")
    return out


def _base_weights(denoiser: torch.nn.Module | None):
    if denoiser is None:
        return None

    def weight(name: str) -> torch.Tensor:
        module = denoiser.get_submodule(name)
        return getattr(module, "base_layer", module).weight.detach()

    return weight


def is_kohya_state_dict(state_dict: dict) -> bool:
    return bool(state_dict) and all(key.startswith(KOHYA_PREFIXES) for key in state_dict)


def from_kohya_state_dict(
    state_dict: dict[str, torch.Tensor], table: dict[str, tuple[str, str]], source: str = "LoRA file"
) -> LoraWeights:
    """Invert :func:`to_kohya_state_dict` using a :func:`kohya_name_table` of the target model.

    Unknown stems and parts no supported type reads are an error naming the first one: silently
    dropping part of a network is how "my LoRA does nothing" bugs start.
    """
    fused = getattr(table, "fused", {})
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, {})[part] = tensor
    weights: LoraWeights = {}
    for stem, parts in sorted(stems.items()):
        where = f"{source}: {stem}"
        if stem in fused:
            component, kohya_module = fused[stem]
            module_weights = module_from_parts(parts, where)
            if not isinstance(module_weights, LoraModuleWeights):
                raise LorafitError(f"{where}: {module_weights.kind} on a fused module is not supported")
            for (name, _), part in zip(kohya_module.parts, split(kohya_module, module_weights, where)):
                weights.setdefault(component, {})[name] = part
            continue
        if stem not in table:
            raise LorafitError(f"{source}: key {stem} names no module of this base model (wrong family or base?)")
        component, module = table[stem]
        weights.setdefault(component, {})[module] = module_from_parts(parts, where)
    return weights
