"""Flux.1's two module layouts: diffusers' ``FluxTransformer2DModel`` and BFL's original one.

kohya's ``networks/lora_flux.py``, ComfyUI and Forge name LoRA modules after BFL's model
(``lora_unet_double_blocks_0_img_attn_qkv``), where several diffusers Linears are one: the image
stream's ``to_q``/``to_k``/``to_v`` are ``img_attn.qkv``, the text stream's ``add_*_proj`` are
``txt_attn.qkv``, and a single block's ``attn.to_q``/``to_k``/``to_v`` + ``proj_mlp`` are ``linear1``.
This module is the table between the two, built from a transformer config (block counts and
widths differ between the real model and the tiny test one). The LoRA maths of splitting and
joining fused modules lives in :mod:`lorafit.networks.fused_lora`.

One BFL module differs by more than a name: ``final_layer.adaLN_modulation.1`` emits (shift,
scale) where diffusers' ``norm_out.linear`` emits (scale, shift), so its rows swap halves (the
same swap diffusers applies when converting BFL checkpoints and kohya LoRAs).
"""

from __future__ import annotations

from typing import Any

from lorafit.families.family import KohyaModule


def _get(config: Any, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def bfl_modules(config: Any, prefix: str = "lora_unet") -> dict[str, KohyaModule]:
    """Every Linear of a Flux transformer with ``config``, by kohya stem (``prefix`` + BFL name)."""
    inner = _get(config, "num_attention_heads") * _get(config, "attention_head_dim")
    mlp = int(inner * 4.0)  # FluxSingleTransformerBlock's mlp_ratio
    table: dict[str, KohyaModule] = {}

    def add(bfl: str, *parts: tuple[str, int], swap: bool = False) -> None:
        stem = f"{prefix}_{bfl}".replace(".", "_")
        table[stem] = KohyaModule(stem, tuple(parts), swap, bfl)

    for i in range(_get(config, "num_layers")):
        d = f"transformer_blocks.{i}"
        add(f"double_blocks.{i}.img_attn.qkv", *((f"{d}.attn.to_{x}", inner) for x in "qkv"))
        add(f"double_blocks.{i}.txt_attn.qkv", *((f"{d}.attn.add_{x}_proj", inner) for x in "qkv"))
        add(f"double_blocks.{i}.img_attn.proj", (f"{d}.attn.to_out.0", inner))
        add(f"double_blocks.{i}.txt_attn.proj", (f"{d}.attn.to_add_out", inner))
        add(f"double_blocks.{i}.img_mlp.0", (f"{d}.ff.net.0.proj", mlp))
        add(f"double_blocks.{i}.img_mlp.2", (f"{d}.ff.net.2", inner))
        add(f"double_blocks.{i}.txt_mlp.0", (f"{d}.ff_context.net.0.proj", mlp))
        add(f"double_blocks.{i}.txt_mlp.2", (f"{d}.ff_context.net.2", inner))
        add(f"double_blocks.{i}.img_mod.lin", (f"{d}.norm1.linear", 6 * inner))
        add(f"double_blocks.{i}.txt_mod.lin", (f"{d}.norm1_context.linear", 6 * inner))
    for i in range(_get(config, "num_single_layers")):
        s = f"single_transformer_blocks.{i}"
        add(f"single_blocks.{i}.linear1", *((f"{s}.attn.to_{x}", inner) for x in "qkv"), (f"{s}.proj_mlp", mlp))
        add(f"single_blocks.{i}.linear2", (f"{s}.proj_out", inner))
        add(f"single_blocks.{i}.modulation.lin", (f"{s}.norm.linear", 3 * inner))
    add("img_in", ("x_embedder", inner))
    add("txt_in", ("context_embedder", inner))
    for bfl, diffusers in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")):
        add(f"{bfl}.in_layer", (f"time_text_embed.{diffusers}.linear_1", inner))
        add(f"{bfl}.out_layer", (f"time_text_embed.{diffusers}.linear_2", inner))
    if _get(config, "guidance_embeds"):
        add("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1", inner))
        add("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2", inner))
    out_channels = _get(config, "out_channels") or _get(config, "in_channels")
    patch = _get(config, "patch_size", 1)
    add("final_layer.linear", ("proj_out", patch * patch * out_channels))
    add("final_layer.adaLN_modulation.1", ("norm_out.linear", 2 * inner), swap=True)
    return table


def diffusers_to_bfl(config: Any, prefix: str = "lora_unet") -> dict[str, tuple[KohyaModule, int]]:
    """diffusers module name -> (its BFL module, its index among that module's parts)."""
    return {
        name: (module, k) for module in bfl_modules(config, prefix).values() for k, (name, _) in enumerate(module.parts)
    }


# RMSNorm scales of the attention's q/k, the only BFL weights that are not a Linear's.
def _norm_names(config: Any) -> dict[str, str]:
    names = {}
    for i in range(_get(config, "num_layers")):
        d, b = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        names.update(
            {
                f"{d}.norm_q.weight": f"{b}.img_attn.norm.query_norm.scale",
                f"{d}.norm_k.weight": f"{b}.img_attn.norm.key_norm.scale",
                f"{d}.norm_added_q.weight": f"{b}.txt_attn.norm.query_norm.scale",
                f"{d}.norm_added_k.weight": f"{b}.txt_attn.norm.key_norm.scale",
            }
        )
    for i in range(_get(config, "num_single_layers")):
        s, b = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        names.update(
            {f"{s}.norm_q.weight": f"{b}.norm.query_norm.scale", f"{s}.norm_k.weight": f"{b}.norm.key_norm.scale"}
        )
    return names


def bfl_state_dict(transformer) -> dict:
    """The weights of a diffusers ``FluxTransformer2DModel`` under BFL's names (``flux1-dev.safetensors``'s
    layout, which diffusers' ``from_single_file``, ComfyUI and Forge load): fused Linears concatenated,
    the final modulation's halves swapped back. Every weight is placed or this raises."""
    import torch

    state = transformer.state_dict()
    out, used = {}, set()
    for module in bfl_modules(transformer.config).values():
        bfl = module.path
        for kind in ("weight", "bias"):
            tensors = [state[f"{name}.{kind}"] for name, _ in module.parts]
            used.update(f"{name}.{kind}" for name, _ in module.parts)
            tensor = torch.cat(tensors) if module.fused else tensors[0]
            if module.swap_halves:
                half = tensor.shape[0] // 2
                tensor = torch.cat([tensor[half:], tensor[:half]])
            out[f"{bfl}.{kind}"] = tensor
    for name, bfl in _norm_names(transformer.config).items():
        out[bfl] = state[name]
        used.add(name)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"no BFL name for {missing[:3]} ({len(missing)} weights)")
    return out


def diffusers_state_dict(bfl: dict, config: Any) -> dict:
    """The inverse of :func:`bfl_state_dict`: BFL-named weights (optionally under
    ``model.diffusion_model.``) to a ``FluxTransformer2DModel`` of ``config``'s state dict.

    diffusers' own reader (``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes the
    released models' width (3072), so transformers of other sizes, the tiny test models among
    them, go through this one; tests check the two agree on the real width.
    """
    import torch

    bfl = {k.removeprefix("model.diffusion_model."): v for k, v in bfl.items()}
    out = {}
    for module in bfl_modules(config).values():
        for kind in ("weight", "bias"):
            tensor = bfl.pop(f"{module.path}.{kind}", None)
            if tensor is None:
                raise ValueError(f"{module.path}.{kind} is missing")
            if module.swap_halves:
                half = tensor.shape[0] // 2
                tensor = torch.cat([tensor[half:], tensor[:half]])
            pieces = torch.split(tensor, [rows for _, rows in module.parts]) if module.fused else [tensor]
            out.update({f"{name}.{kind}": piece for (name, _), piece in zip(module.parts, pieces)})
    for name, original in _norm_names(config).items():
        out[name] = bfl.pop(original)
    if bfl:
        raise ValueError(f"{len(bfl)} weights have no place in this transformer, e.g. {sorted(bfl)[0]}")
    return out
