"""Stable Diffusion 3/3.5's two module layouts: diffusers' ``SD3Transformer2DModel`` and SAI's MMDiT.

SAI's files (``sd3.5_large.safetensors``), ComfyUI and kohya's sd-scripts (``networks/lora_sd3.py``,
``lora_unet_`` + the MMDiT path, "ComfyUI compatible") name modules as the MMDiT does: each joint block has
an image stream (``x_block``) and a text stream (``context_block``) whose q/k/v are one ``attn.qkv`` Linear;
SD3.5 Medium's first blocks add a second image attention (``x_block.attn2``). The last block's text
stream is "pre-only" (q/k/v and its modulation, nothing after), and its modulation emits (shift, scale)
where diffusers' ``norm1_context`` emits (scale, shift), as does the final layer's: those rows swap halves.
The table is built from a config (block counts and widths differ between Large, Medium and the tiny
test model); diffusers' single-file reader (``convert_sd3_transformer_checkpoint_to_diffusers``, which
reads any width) is the inverse of :func:`original_state_dict`, which tests check.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafit.families.family import KohyaModule


def _get(config: Any, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def original_modules(config: Any, prefix: str = "lora_unet") -> dict[str, KohyaModule]:
    """Every Linear (and the patch embedding's Conv2d) of an SD3 transformer with ``config``, by kohya stem."""
    inner = _get(config, "num_attention_heads") * _get(config, "attention_head_dim")
    layers = _get(config, "num_layers")
    dual = set(_get(config, "dual_attention_layers") or ())
    table: dict[str, KohyaModule] = {}

    def add(path: str, *parts: tuple[str, int], swap: bool = False) -> None:
        stem = f"{prefix}_{path}".replace(".", "_")
        table[stem] = KohyaModule(stem, tuple(parts), swap, path)

    for i in range(layers):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        add(f"{x}.attn.qkv", *((f"{d}.attn.to_{n}", inner) for n in "qkv"))
        add(f"{x}.attn.proj", (f"{d}.attn.to_out.0", inner))
        if i in dual:
            add(f"{x}.attn2.qkv", *((f"{d}.attn2.to_{n}", inner) for n in "qkv"))
            add(f"{x}.attn2.proj", (f"{d}.attn2.to_out.0", inner))
        add(f"{x}.mlp.fc1", (f"{d}.ff.net.0.proj", 4 * inner))
        add(f"{x}.mlp.fc2", (f"{d}.ff.net.2", inner))
        add(f"{x}.adaLN_modulation.1", (f"{d}.norm1.linear", (9 if i in dual else 6) * inner))
        add(f"{c}.attn.qkv", *((f"{d}.attn.add_{n}_proj", inner) for n in "qkv"))
        if i < layers - 1:
            add(f"{c}.attn.proj", (f"{d}.attn.to_add_out", inner))
            add(f"{c}.mlp.fc1", (f"{d}.ff_context.net.0.proj", 4 * inner))
            add(f"{c}.mlp.fc2", (f"{d}.ff_context.net.2", inner))
            add(f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear", 6 * inner))
        else:  # pre-only: (shift, scale) in the MMDiT, (scale, shift) in diffusers
            add(f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear", 2 * inner), swap=True)
    add("x_embedder.proj", ("pos_embed.proj", inner))
    add("context_embedder", ("context_embedder", inner))
    for original, diffusers in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        add(f"{original}.mlp.0", (f"time_text_embed.{diffusers}.linear_1", inner))
        add(f"{original}.mlp.2", (f"time_text_embed.{diffusers}.linear_2", inner))
    out_channels = _get(config, "out_channels") or _get(config, "in_channels")
    add("final_layer.linear", ("proj_out", _get(config, "patch_size") ** 2 * out_channels))
    add("final_layer.adaLN_modulation.1", ("norm_out.linear", 2 * inner), swap=True)
    return table


def _other_names(config: Any) -> dict[str, str]:
    """The weights that are not a Linear's: q/k RMSNorm scales and the positional embedding."""
    names = {"pos_embed.pos_embed": "pos_embed"}
    if _get(config, "qk_norm"):
        for i in range(_get(config, "num_layers")):
            d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
            names[f"{d}.attn.norm_q.weight"] = f"{x}.attn.ln_q.weight"
            names[f"{d}.attn.norm_k.weight"] = f"{x}.attn.ln_k.weight"
            names[f"{d}.attn.norm_added_q.weight"] = f"{c}.attn.ln_q.weight"
            names[f"{d}.attn.norm_added_k.weight"] = f"{c}.attn.ln_k.weight"
            if i in set(_get(config, "dual_attention_layers") or ()):
                names[f"{d}.attn2.norm_q.weight"] = f"{x}.attn2.ln_q.weight"
                names[f"{d}.attn2.norm_k.weight"] = f"{x}.attn2.ln_k.weight"
    return names


def original_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The weights of a diffusers ``SD3Transformer2DModel`` under the MMDiT's names (the layout of SAI's and
    ComfyUI's files): q/k/v concatenated, the swapped modulations' halves swapped back. Every weight is
    placed or this raises."""
    state = transformer.state_dict()
    out, used = {}, set()
    for module in original_modules(transformer.config).values():
        for kind in ("weight", "bias"):
            names = [f"{name}.{kind}" for name, _ in module.parts]
            tensor = torch.cat([state[n] for n in names]) if module.fused else state[names[0]]
            if module.swap_halves:
                half = tensor.shape[0] // 2
                tensor = torch.cat([tensor[half:], tensor[:half]])
            out[f"{module.path}.{kind}"] = tensor
            used.update(names)
    for name, original in _other_names(transformer.config).items():
        out[original] = state[name]
        used.add(name)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"no MMDiT name for {missing[:3]} ({len(missing)} weights)")
    return out
