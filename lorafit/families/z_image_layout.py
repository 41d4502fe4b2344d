"""Z-Image's two module layouts: diffusers' ``ZImageTransformer2DModel`` and ComfyUI's native one.

ComfyUI runs Z-Image as its Lumina2 (NextDiT) model and ships it so
(``diffusion_models/z_image_turbo_bf16.safetensors``): the attention's ``to_q``/``to_k``/``to_v`` are
one ``attention.qkv`` Linear, ``to_out.0`` is ``attention.out``, and the patch embedder and final layer
drop diffusers' per-patch-size dictionaries (``all_x_embedder.2-1`` -> ``x_embedder``). Its LoRA loader
(``comfy/lora.py``) reads ``lora_unet_`` + a native module path, so a kohya file for ComfyUI fuses q/k/v
as kohya's musubi-tuner does when it converts its Z-Image LoRAs for ComfyUI
(``convert_z_image_lora_to_comfy.py``). diffusers' single-file reader
(``convert_z_image_transformer_checkpoint_to_diffusers``) is the inverse of :func:`native_state_dict`,
which tests check.
"""

from __future__ import annotations

from typing import Any

from lorafit.families.family import KohyaModule

_BLOCK_LINEARS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# RMSNorm weights and learnt tokens: renamed (q/k norms) or kept, in the native file only.
_NORMS = {"attention.norm_q": "attention.q_norm", "attention.norm_k": "attention.k_norm"}
_KEPT_NORMS = ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")


def _get(config: Any, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _patch_key(config: Any) -> str:
    sizes = list(zip(_get(config, "all_patch_size", (2,)), _get(config, "all_f_patch_size", (1,))))
    if len(sizes) != 1:
        raise ValueError(f"Z-Image with {len(sizes)} patch sizes has no ComfyUI layout")
    return f"{sizes[0][0]}-{sizes[0][1]}"


def _blocks(config: Any) -> list[tuple[str, bool]]:
    """(block path, has modulation) of every transformer block: context refiners have no AdaLN."""
    refiners = _get(config, "n_refiner_layers", 2)
    return [
        *((f"noise_refiner.{i}", True) for i in range(refiners)),
        *((f"context_refiner.{i}", False) for i in range(refiners)),
        *((f"layers.{i}", True) for i in range(_get(config, "n_layers"))),
    ]


def comfy_modules(config: Any, prefix: str = "lora_unet") -> dict[str, KohyaModule]:
    """Every Linear of a Z-Image transformer with ``config``, by kohya stem (``prefix`` + native path)."""
    dim = _get(config, "dim")
    hidden = int(dim / 3 * 8)  # the SwiGLU feed-forward's width
    adaln = min(dim, 256)  # diffusers' ADALN_EMBED_DIM: the time embedding's width
    patch_size, f_patch_size = (int(x) for x in _patch_key(config).split("-"))
    table: dict[str, KohyaModule] = {}

    def add(native: str, *parts: tuple[str, int]) -> None:
        stem = f"{prefix}_{native}".replace(".", "_")
        table[stem] = KohyaModule(stem, tuple(parts), False, native)

    for block, modulated in _blocks(config):
        add(f"{block}.attention.qkv", *((f"{block}.attention.to_{x}", dim) for x in "qkv"))
        add(f"{block}.attention.out", (f"{block}.attention.to_out.0", dim))
        for name, rows in zip(_BLOCK_LINEARS, (hidden, dim, hidden)):
            add(f"{block}.{name}", (f"{block}.{name}", rows))
        if modulated:
            add(f"{block}.adaLN_modulation.0", (f"{block}.adaLN_modulation.0", 4 * dim))  # scale/gate x attn/mlp
    patch = _patch_key(config)
    add("x_embedder", (f"all_x_embedder.{patch}", dim))
    pixels = patch_size * patch_size * f_patch_size * _get(config, "in_channels", 16)
    add("final_layer.linear", (f"all_final_layer.{patch}.linear", pixels))
    add("final_layer.adaLN_modulation.1", (f"all_final_layer.{patch}.adaLN_modulation.1", dim))
    add("cap_embedder.1", ("cap_embedder.1", dim))
    add("t_embedder.mlp.0", ("t_embedder.mlp.0", 1024))  # diffusers' TimestepEmbedder(mid_size=1024)
    add("t_embedder.mlp.2", ("t_embedder.mlp.2", adaln))
    return table


def native_state_dict(transformer) -> dict:
    """The weights of a diffusers ``ZImageTransformer2DModel`` under ComfyUI's native names (the layout of
    ComfyUI's Z-Image files): q/k/v concatenated, the rest renamed. Every weight is placed or this raises."""
    import torch

    state = transformer.state_dict()
    out, used = {}, set()
    for module in comfy_modules(transformer.config).values():
        for kind in ("weight", "bias"):
            names = [f"{name}.{kind}" for name, _ in module.parts]
            if all(name not in state for name in names):
                continue  # Z-Image's attention and feed-forward Linears have no bias
            out[f"{module.path}.{kind}"] = torch.cat([state[n] for n in names]) if module.fused else state[names[0]]
            used.update(names)
    for block, _ in _blocks(transformer.config):
        for name in (*_NORMS, *_KEPT_NORMS):
            key = f"{block}.{name}.weight"
            out[f"{block}.{_NORMS.get(name, name)}.weight"] = state[key]
            used.add(key)
    for key in ("cap_embedder.0.weight", "x_pad_token", "cap_pad_token"):
        out[key] = state[key]
        used.add(key)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"no ComfyUI name for {missing[:3]} ({len(missing)} weights)")
    return out
