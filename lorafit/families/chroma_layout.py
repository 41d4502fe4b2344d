"""Chroma's two module layouts: diffusers' ``ChromaTransformer2DModel`` and the original (lodestone's) one.

Chroma keeps FLUX.1's blocks and BFL's names (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``)
but prunes every modulation Linear (``img_mod``, ``modulation``, the final ``adaLN_modulation``) and the
time/vector/guidance embedders: one ``distilled_guidance_layer`` (the approximator, an MLP of residual
layers) computes all modulation vectors from the timestep. ComfyUI runs Chroma under these original
names and maps ``lora_unet_`` + a module path onto them generically (``comfy/lora.py``), ai-toolkit writes
``diffusion_model.`` + the same paths: so the kohya file uses FLUX.1's fused names
(:func:`lorafit.families.flux_layout.bfl_modules`) minus what Chroma pruned, plus the approximator's.
The original files (``Chroma1-HD.safetensors``) also name the approximator's RMSNorm scales ``norms.N.scale``.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafit.families.family import KohyaModule
from lorafit.families.flux_layout import _get
from lorafit.families.flux_layout import _norm_names as flux_norm_names
from lorafit.families.flux_layout import bfl_modules as flux_modules

_PRUNED = ("norm1.linear", "norm1_context.linear", "norm.linear", "time_text_embed.", "norm_out.linear")


def original_modules(config: Any, prefix: str = "lora_unet") -> dict[str, KohyaModule]:
    """Every Linear of a Chroma transformer with ``config``, by kohya stem (``prefix`` + original name)."""
    flux_config = {key: _get(config, key) for key in ("num_layers", "num_single_layers", "in_channels")}
    flux_config.update(
        num_attention_heads=_get(config, "num_attention_heads"),
        attention_head_dim=_get(config, "attention_head_dim"),
        out_channels=_get(config, "out_channels"),
        patch_size=_get(config, "patch_size", 1),
        guidance_embeds=False,
    )
    table = {
        stem: module
        for stem, module in flux_modules(flux_config, prefix).items()
        if not any(part.endswith(_PRUNED) or part.startswith(_PRUNED) for part, _ in module.parts)
    }
    hidden = _get(config, "approximator_hidden_dim")

    def add(path: str, diffusers: str, rows: int) -> None:
        stem = f"{prefix}_{path}".replace(".", "_")
        table[stem] = KohyaModule(stem, ((diffusers, rows),), False, path)

    approximator = "distilled_guidance_layer"
    add(f"{approximator}.in_proj", f"{approximator}.in_proj", hidden)
    for i in range(_get(config, "approximator_layers")):
        add(f"{approximator}.layers.{i}.in_layer", f"{approximator}.layers.{i}.linear_1", hidden)
        add(f"{approximator}.layers.{i}.out_layer", f"{approximator}.layers.{i}.linear_2", hidden)
    inner = _get(config, "num_attention_heads") * _get(config, "attention_head_dim")
    add(f"{approximator}.out_proj", f"{approximator}.out_proj", inner)
    return table


def _norm_names(config: Any) -> dict[str, str]:
    """The weights that are not a Linear's: q/k RMSNorm scales (FLUX.1's) and the approximator's norms."""
    names = flux_norm_names(config)
    for i in range(_get(config, "approximator_layers")):
        names[f"distilled_guidance_layer.norms.{i}.weight"] = f"distilled_guidance_layer.norms.{i}.scale"
    return names


def original_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The weights of a diffusers ``ChromaTransformer2DModel`` under the original names (the layout of
    ``Chroma1-HD.safetensors``, which diffusers' ``from_single_file`` and ComfyUI read): fused Linears
    concatenated. Every weight is placed or this raises."""
    state = transformer.state_dict()
    out, used = {}, set()
    for module in original_modules(transformer.config).values():
        for kind in ("weight", "bias"):
            names = [f"{name}.{kind}" for name, _ in module.parts]
            out[f"{module.path}.{kind}"] = torch.cat([state[n] for n in names]) if module.fused else state[names[0]]
            used.update(names)
    for name, original in _norm_names(transformer.config).items():
        out[original] = state[name]
        used.add(name)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"no original name for {missing[:3]} ({len(missing)} weights)")
    return out


def diffusers_state_dict(original: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_state_dict` (keys optionally under ``model.diffusion_model.``).

    diffusers' reader (``convert_chroma_transformer_checkpoint_to_diffusers``) hard-codes the released
    width (3072), so transformers of other sizes, the tiny test ones among them, go through this one;
    a test checks the two agree on the released width.
    """
    original = {k.removeprefix("model.diffusion_model."): v for k, v in original.items()}
    out = {}
    for module in original_modules(config).values():
        for kind in ("weight", "bias"):
            tensor = original.pop(f"{module.path}.{kind}", None)
            if tensor is None:
                raise ValueError(f"{module.path}.{kind} is missing")
            pieces = torch.split(tensor, [rows for _, rows in module.parts]) if module.fused else [tensor]
            out.update({f"{name}.{kind}": piece for (name, _), piece in zip(module.parts, pieces)})
    for name, path in _norm_names(config).items():
        out[name] = original.pop(path)
    if original:
        raise ValueError(f"{len(original)} weights have no place in this transformer, e.g. {sorted(original)[0]}")
    return out
