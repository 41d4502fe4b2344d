"""FLUX.2's two module layouts: diffusers' ``Flux2Transformer2DModel`` and BFL's original one.

BFL's files (``flux-2-klein-base-4b.safetensors``), ComfyUI, and kohya's musubi-tuner (``lora_flux_2``)
name modules as BFL's model does: the double blocks' q/k/v are one ``img_attn.qkv`` / ``txt_attn.qkv``
Linear, the MLPs are ``img_mlp.0``/``img_mlp.2``, the modulation is shared by all blocks of a kind
(``double_stream_modulation_img.lin``). Unlike FLUX.1, diffusers already fuses a single block's
attention and MLP input into one Linear (``attn.to_qkv_mlp_proj`` = BFL's ``linear1``), so only the
double blocks' q/k/v need joining. The final modulation emits (shift, scale) in BFL's model and
(scale, shift) in diffusers', so its rows swap halves. The table is built from a config (block
counts and widths differ between the released and the tiny models); diffusers' single-file reader
(``convert_flux2_transformer_checkpoint_to_diffusers``) is the inverse of :func:`bfl_state_dict`,
which tests check.
"""

from __future__ import annotations

from typing import Any

from lorafit.families.family import KohyaModule


def _get(config: Any, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def bfl_modules(config: Any, prefix: str = "lora_unet") -> dict[str, KohyaModule]:
    """Every Linear of a FLUX.2 transformer with ``config``, by kohya stem (``prefix`` + BFL name)."""
    inner = _get(config, "num_attention_heads") * _get(config, "attention_head_dim")
    mlp = int(inner * _get(config, "mlp_ratio", 3.0))  # the SwiGLU's hidden width; its input Linear emits 2x
    out_channels = _get(config, "out_channels") or _get(config, "in_channels")
    table: dict[str, KohyaModule] = {}

    def add(bfl: str, *parts: tuple[str, int], swap: bool = False) -> None:
        stem = f"{prefix}_{bfl}".replace(".", "_")
        table[stem] = KohyaModule(stem, tuple(parts), swap, bfl)

    for i in range(_get(config, "num_layers")):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        add(f"{b}.img_attn.qkv", *((f"{d}.attn.to_{x}", inner) for x in "qkv"))
        add(f"{b}.txt_attn.qkv", *((f"{d}.attn.add_{x}_proj", inner) for x in "qkv"))
        add(f"{b}.img_attn.proj", (f"{d}.attn.to_out.0", inner))
        add(f"{b}.txt_attn.proj", (f"{d}.attn.to_add_out", inner))
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            add(f"{b}.{stream}_mlp.0", (f"{d}.{ff}.linear_in", 2 * mlp))
            add(f"{b}.{stream}_mlp.2", (f"{d}.{ff}.linear_out", inner))
    for i in range(_get(config, "num_single_layers")):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        add(f"{b}.linear1", (f"{s}.attn.to_qkv_mlp_proj", 3 * inner + 2 * mlp))
        add(f"{b}.linear2", (f"{s}.attn.to_out", inner))
    add("img_in", ("x_embedder", inner))
    add("txt_in", ("context_embedder", inner))
    add("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1", inner))
    add("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2", inner))
    if _get(config, "guidance_embeds"):
        add("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1", inner))
        add("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2", inner))
    for name, sets in (("double_stream_modulation_img", 2), ("double_stream_modulation_txt", 2)):
        add(f"{name}.lin", (f"{name}.linear", 3 * sets * inner))  # shift, scale, gate per set
    add("single_stream_modulation.lin", ("single_stream_modulation.linear", 3 * inner))
    add("final_layer.linear", ("proj_out", _get(config, "patch_size", 1) ** 2 * out_channels))
    add("final_layer.adaLN_modulation.1", ("norm_out.linear", 2 * inner), swap=True)
    return table


def _norm_names(config: Any) -> dict[str, str]:
    """RMSNorm scales of the attention's q/k: diffusers name -> BFL name."""
    names = {}
    for i in range(_get(config, "num_layers")):
        d, b = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        names[f"{d}.norm_q.weight"] = f"{b}.img_attn.norm.query_norm.scale"
        names[f"{d}.norm_k.weight"] = f"{b}.img_attn.norm.key_norm.scale"
        names[f"{d}.norm_added_q.weight"] = f"{b}.txt_attn.norm.query_norm.scale"
        names[f"{d}.norm_added_k.weight"] = f"{b}.txt_attn.norm.key_norm.scale"
    for i in range(_get(config, "num_single_layers")):
        s, b = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        names[f"{s}.norm_q.weight"] = f"{b}.norm.query_norm.scale"
        names[f"{s}.norm_k.weight"] = f"{b}.norm.key_norm.scale"
    return names


def bfl_state_dict(transformer) -> dict:
    """The weights of a diffusers ``Flux2Transformer2DModel`` under BFL's names (the layout of BFL's and
    ComfyUI's FLUX.2 files): q/k/v concatenated, the final modulation's halves swapped back. Every weight
    is placed or this raises."""
    import torch

    state = transformer.state_dict()
    out, used = {}, set()
    for module in bfl_modules(transformer.config).values():
        names = [f"{name}.weight" for name, _ in module.parts]  # FLUX.2's Linears have no bias
        tensor = torch.cat([state[n] for n in names]) if module.fused else state[names[0]]
        if module.swap_halves:
            half = tensor.shape[0] // 2
            tensor = torch.cat([tensor[half:], tensor[:half]])
        out[f"{module.path}.weight"] = tensor
        used.update(names)
    for name, bfl in _norm_names(transformer.config).items():
        out[bfl] = state[name]
        used.add(name)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"no BFL name for {missing[:3]} ({len(missing)} weights)")
    return out
