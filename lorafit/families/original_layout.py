"""Diffusers UNet module names -> names in the original Stable Diffusion / SGM ("LDM") UNet.

The original UNet (CompVis ``ldm`` and Stability's ``sgm`` code, which A1111, ComfyUI and kohya
use) flattens the network into ``input_blocks``/``middle_block``/``output_blocks`` lists, where
diffusers nests ``down_blocks.{level}.resnets.{layer}``. kohya's SDXL LoRAs are named by that
original path (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), and single-file
checkpoints store the UNet under it.

diffusers ships only the original -> diffusers direction (``convert_ldm_unet_checkpoint`` inside
``from_single_file``, and ``_maybe_map_sgm_blocks_to_diffusers`` for kohya LoRAs); it has no
public function for diffusers -> original, so this module writes that direction by hand. Every
index is computed from the UNet config (levels, block types, ``layers_per_block``), never taken
from a real model, so tiny test UNets get the same treatment as SD1.5 or SDXL.

The original numbering, for ``L`` layers per level:

* ``input_blocks.0.0`` is ``conv_in``; level ``i`` layer ``j`` is ``input_blocks.{1 + i*(L+1) + j}``
  with ``.0`` the resnet and ``.1`` the transformer; each level but the last ends with its
  downsampler ``input_blocks.{(i+1)*(L+1)}.0.op``.
* ``middle_block.0/1/2`` are resnet / transformer / resnet.
* Up level ``i`` has ``L+1`` layers: ``output_blocks.{i*(L+1) + j}`` with ``.0`` resnet and ``.1``
  transformer; its upsampler sits in the level's last output block after them (``.1.conv`` when
  the level has no transformers, ``.2.conv`` when it does).
* Resnet internals are renamed (``norm1`` -> ``in_layers.0`` ...); transformer internals keep
  their names, which diffusers copied from the original.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from lorafit.errors import LorafitError

# Original ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv]; only the modules with weights are named here.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has transformers
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPE = "UNetMidBlock2DCrossAttn"


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a diffusers ``FrozenDict``, a plain mapping or an attribute-style config."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _layout_key(config: Any) -> tuple:
    """The config values that decide the original numbering, as a hashable cache key."""
    down = tuple(_config_value(config, "down_block_types"))
    up = tuple(_config_value(config, "up_block_types"))
    layers = _config_value(config, "layers_per_block", 2)
    layers = tuple(layers) if isinstance(layers, Sequence) else (int(layers),) * len(down)
    return (
        down,
        up,
        layers,
        _config_value(config, "mid_block_type", _MID_TYPE),
        _config_value(config, "addition_embed_type"),
        _config_value(config, "class_embed_type"),
    )


@lru_cache(maxsize=32)
def _block_table(key: tuple) -> dict[str, tuple[str, str]]:
    """Map each diffusers block prefix to ``(original prefix, kind)`` for one UNet layout.

    ``kind`` says how the rest of the name is translated: ``resnet`` renames the resnet's parts,
    ``down`` renames the downsampler's ``conv`` to ``op``, ``same`` keeps the rest as it is.
    """
    down, up, layers, mid, addition_embed_type, class_embed_type = key
    unknown = sorted({t for t in down if t not in _DOWN_TYPES} | {t for t in up if t not in _UP_TYPES})
    if unknown or mid != _MID_TYPE or len(down) != len(up) or len(layers) != len(down):
        raise LorafitError(
            f"UNet layout has no Stable Diffusion original counterpart (block types {unknown or [mid]}, "
            f"{len(down)} down / {len(up)} up levels): only SD1/SD2/SDXL-style UNets are supported"
        )
    table: dict[str, tuple[str, str]] = {
        "conv_in": ("input_blocks.0.0", "same"),
        "time_embedding.linear_1": ("time_embed.0", "same"),
        "time_embedding.linear_2": ("time_embed.2", "same"),
        "conv_norm_out": ("out.0", "same"),
        "conv_out": ("out.2", "same"),
    }
    # SDXL's text_time MLP and the class embeddings of other variants both become label_emb.0 in
    # the original, exactly as diffusers' converter reads them back.
    if addition_embed_type == "text_time":
        table["add_embedding.linear_1"] = ("label_emb.0.0", "same")
        table["add_embedding.linear_2"] = ("label_emb.0.2", "same")
    if class_embed_type in ("timestep", "projection"):
        table["class_embedding.linear_1"] = ("label_emb.0.0", "same")
        table["class_embedding.linear_2"] = ("label_emb.0.2", "same")

    levels = len(down)
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down):
        for layer in range(layers[level]):
            table[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", "resnet")
            if _DOWN_TYPES[block_type]:
                table[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", "same")
            index += 1
        if level < levels - 1:  # diffusers gives every level but the last a downsampler
            table[f"down_blocks.{level}.downsamplers.0"] = (f"input_blocks.{index}.0", "down")
            index += 1

    table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "same")
    table["mid_block.resnets.1"] = ("middle_block.2", "resnet")

    index = 0
    for level, block_type in enumerate(up):
        # Up level i mirrors down level (levels-1-i) and has one layer more (the skip from its
        # downsampler, or from conv_in for the last level).
        for layer in range(layers[levels - 1 - level] + 1):
            table[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", "resnet")
            if _UP_TYPES[block_type]:
                table[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", "same")
            index += 1
        if level < levels - 1:
            slot = 2 if _UP_TYPES[block_type] else 1
            table[f"up_blocks.{level}.upsamplers.0"] = (f"output_blocks.{index - 1}.{slot}", "same")
    return table


def unet_module_to_original(name: str, unet_config: Any) -> str:
    """Translate a diffusers ``UNet2DConditionModel`` module (or parameter) path to the original one.

    Args:
        name: Module path as in ``unet.named_modules()``, e.g.
            ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``; a parameter path
            (``...to_q.weight``) works too, its last part is kept.
        unet_config: The UNet's ``config`` (or any mapping with ``down_block_types``,
            ``up_block_types``, ``layers_per_block`` and optionally ``addition_embed_type``).

    Returns:
        The path in the original UNet, without the ``model.diffusion_model.`` prefix, e.g.
        ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for the SDXL config.

    Raises:
        LorafitError: If ``name`` has no counterpart in the original UNet (a container such as
            ``down_blocks.1``, a weightless module such as ``time_proj``) or the UNet is not an
            SD1/SD2/SDXL-style UNet.
    """
    table = _block_table(_layout_key(unet_config))
    parts = name.split(".")
    # Block prefixes are at most four parts deep (``down_blocks.1.attentions.0``); try the longest
    # first so that ``time_embedding.linear_1`` never matches a shorter entry.
    for depth in range(min(4, len(parts)), 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix not in table:
            continue
        original, kind = table[prefix]
        rest = parts[depth:]
        if rest and kind == "resnet":
            if rest[0] not in _RESNET_PARTS:
                break
            rest = [_RESNET_PARTS[rest[0]], *rest[1:]]
        elif rest and kind == "down":
            if rest[0] != "conv":
                break
            rest = ["op", *rest[1:]]
        return ".".join([original, *rest])
    raise LorafitError(f"UNet module {name!r} has no counterpart in the original (LDM/SGM) UNet layout")


def original_unet_names(unet) -> dict[str, str]:
    """Map every module of ``unet`` that exists in the original layout to its original path.

    Modules without a counterpart (``down_blocks.1`` itself, ``time_proj``, a resnet's shared
    ``nonlinearity``) are left out; every module that holds weights is included.

    Args:
        unet: An instantiated ``UNet2DConditionModel`` (the meta device is fine).

    Returns:
        ``{diffusers module path: original module path}``, one-to-one.
    """
    names: dict[str, str] = {}
    for name, _ in unet.named_modules():
        if not name:
            continue
        try:
            names[name] = unet_module_to_original(name, unet.config)
        except LorafitError:
            continue
    if len(set(names.values())) != len(names):
        # Not LorafitError: a collision is a bug in the table above, never the user's doing.
        raise AssertionError("diffusers -> original UNet name map is not one-to-one")
    return names


@lru_cache(maxsize=8)
def _inverse_names(config_json: str) -> dict[str, str]:
    """Original -> diffusers module paths for a UNet config, built on the meta device (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    return {original: name for name, original in original_unet_names(unet).items()}


def original_module_to_unet(name: str, unet_config: Any) -> str:
    """Translate an original (LDM/SGM) UNet module or parameter path to the diffusers one.

    This inverts :func:`unet_module_to_original` over the module names of a UNet built from
    ``unet_config`` on the meta device, so both directions agree by construction.

    Args:
        name: Original path without ``model.diffusion_model.``, e.g.
            ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` or ``out.2.weight``.
        unet_config: The diffusers UNet config the name refers to (a mapping such as ``unet.config``).

    Returns:
        The diffusers module (or parameter) path.

    Raises:
        LorafitError: If no module of that UNet has this original name.
    """
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    inverse = _inverse_names(json.dumps(config, sort_keys=True, default=list))
    if name in inverse:
        return inverse[name]
    module, _, leaf = name.rpartition(".")
    if module in inverse:  # a parameter of a mapped module: ``.weight`` / ``.bias``
        return f"{inverse[module]}.{leaf}"
    raise LorafitError(f"original UNet module {name!r} does not exist in this UNet (check the model family)")
