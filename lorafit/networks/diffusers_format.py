"""The diffusers/PEFT LoRA format: key names both ways, as diffusers' own ``load_lora_weights`` reads them.

Keys are ``<component>.<module>.<part>`` (``unet.down_blocks.0...to_q.lora_A.weight``) plus the
``lora_adapter_metadata`` header (a PEFT ``LoraConfig`` per component: alphas and DoRA survive a
reload). Two details decide whether a file loads everywhere, both checked with diffusers 0.42's
loader in the tests:

- Text encoders (CLIP) are named by the transformers-4 path, ``text_encoder.text_model.encoder...``:
  diffusers strips ``text_model.`` when the installed transformers (5) flattened ``CLIPTextModel``,
  a transformers-4 install needs it, and ComfyUI maps only that spelling. The config's
  ``target_modules`` stay without it: PEFT matches them as suffixes, so they fit both layouts.
- DoRA magnitudes: the denoiser's are ``<module>.lora_magnitude_vector`` (what PEFT and diffusers
  write); a text encoder's are ``<module>.lora_magnitude_vector.weight``, the name transformers 5's
  adapter loader maps onto the parameter (it reports the bare name as unexpected and leaves the
  magnitudes at their initial values). Both spellings are read.

The reader also takes what other trainers write in this layout: kohya part names
(``transformer.x.lora_down.weight``), per-module ``.alpha`` tensors (ai-toolkit, diffusers' Flux
reader accepts them) and files without metadata (alpha = rank, as diffusers reads them).
"""

from __future__ import annotations

import json

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights, LoraWeights, alpha_from_config, peft_config_for

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_KINDS = {"lora", "dora"}  # network kinds the diffusers/PEFT LoRA format can hold
# Key suffix -> part: PEFT's names, the older diffusers ``lora.down`` names and kohya's part names.
_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".alpha": "alpha",
}
_TEXT_MODEL = "text_model."


def diffusers_can_hold(weights: LoraWeights) -> bool:
    """Whether the format holds ``weights``: LoRA/DoRA only, and DoRA per output channel only (PEFT's)."""
    modules = [m for component in weights.values() for m in component.values()]
    return all(m.kind in DIFFUSERS_KINDS and getattr(m, "dora_axis", 0) in (None, 0) for m in modules)


def file_module_name(family, component: str, module: str) -> str:
    """A module's name in the file: CLIP text encoders' under the transformers-4 ``text_model.`` level."""
    if component in family.clip_components and not module.startswith(_TEXT_MODEL):
        return _TEXT_MODEL + module
    return module


def plain_module_name(component: str, module: str) -> str:
    """A text-encoder module's name without ``text_model.``, which PEFT's suffix matching fits to either layout."""
    return module.removeprefix(_TEXT_MODEL) if component.startswith("text_encoder") else module


def diffusers_layers(family, weights: LoraWeights) -> dict:
    """``save_lora_weights`` keyword arguments (``<component>_lora_layers`` and ``..._lora_adapter_metadata``)."""
    kwargs = {}
    for component, modules in weights.items():
        tensors = {}
        magnitude = ".lora_magnitude_vector" + ("" if component == family.denoiser_component else ".weight")
        for name, m in modules.items():
            key = file_module_name(family, component, name)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = m.down, m.up
            if m.dora_scale is not None:  # PEFT's shape: [out] for a Linear, [1, out, 1, 1] for a conv
                if m.dora_axis != 0:
                    raise LorafitError(
                        f"{component}.{name}: DoRA normalised per input channel has no diffusers/PEFT form "
                        "(PEFT's DoRA is per output channel); write the kohya/LyCORIS format instead"
                    )
                flat = m.dora_scale.flatten()
                tensors[key + magnitude] = flat if m.down.dim() == 2 else flat.reshape(1, -1, 1, 1)
        kwargs[f"{component}_lora_layers"] = tensors
        # Suffix-matched by PEFT, so the same names fit transformers 4 and 5 (see the module docstring).
        kwargs[f"{component}_lora_adapter_metadata"] = peft_config_for(
            {plain_module_name(component, n): m for n, m in modules.items()}
        )
    return kwargs


def from_diffusers_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    """Invert :func:`diffusers_layers` (and read the other trainers' variants in the module docstring).

    Module names are the file's; ``fit_to_model`` puts text-encoder names in the installed
    transformers' layout (``CLIPTextModel`` lost its ``text_model.`` level in transformers 5,
    ``CLIPTextModelWithProjection`` kept it).
    """
    packed = json.loads(metadata.get(METADATA_KEY, "{}"))
    parts_of: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        for suffix, part in _PARTS.items():
            if rest.endswith(suffix):
                parts_of.setdefault((component, rest.removesuffix(suffix)), {})[part] = tensor
                break
        else:
            raise LorafitError(f"{source}: key {key} is neither kohya/LyCORIS nor diffusers/PEFT LoRA format")
    weights: LoraWeights = {}
    for (component, module), parts in sorted(parts_of.items()):
        if not {"down", "up"} <= set(parts):
            missing = "down" if "up" in parts else "up"
            raise LorafitError(f"{source}: {component}.{module} lacks its {missing} matrix")
        config = {k.partition(".")[2]: v for k, v in packed.items() if k.startswith(f"{component}.")}
        if config:
            alpha = alpha_from_config(config, module)
        elif "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        else:  # without lora_adapter_metadata diffusers reloads with alpha = rank; read it the same way
            alpha = float(parts["down"].shape[0])
        dora_scale = parts.get("magnitude")
        if dora_scale is not None:  # back to LyCORIS's [out, 1(, 1, 1)]
            dora_scale = dora_scale.flatten().reshape(-1, *[1] * (parts["down"].dim() - 1))
        weights.setdefault(component, {})[module] = LoraModuleWeights(parts["down"], parts["up"], alpha, dora_scale)
    return weights
