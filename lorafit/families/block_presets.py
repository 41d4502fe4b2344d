"""LoRA target presets of the transformer families, chosen by where a Linear sits in the blocks.

Every transformer family names its presets the same way (docs/network-types.md):

- ``attn``: the attention projections inside the transformer blocks;
- ``attn-mlp``: every Linear inside the blocks except the per-block modulation (AdaLN) layers: what
  kohya's musubi-tuner trains by default on these families (its ``exclude_patterns`` drop
  the ``*_mod*``/``modulation`` Linears);
- ``full``: every Linear of the transformer, embedders, modulation and the final layer included.

A family gives its block prefixes (``transformer_blocks.``), the in-block names of its attention
projections and of its modulation Linears.
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import adaptable_modules

PRESETS = ("attn", "attn-mlp", "full")


def block_preset_modules(
    denoiser: torch.nn.Module,
    preset: str,
    blocks: dict[str, tuple[tuple[str, ...], tuple[str, ...]]],
) -> set[str]:
    """Module names ``preset`` selects. ``blocks``: block prefix (``layers``) -> (attention names,
    modulation names), names relative to one block (``attention.to_q``, ``adaLN_modulation.0``)."""
    if preset not in PRESETS:
        raise LorafitError(f"model.network.preset: {preset!r} is not one of {', '.join(PRESETS)}")
    names = set(adaptable_modules(denoiser))
    if preset == "full":
        return names
    chosen = set()
    for name in names:
        prefix, _, rest = name.partition(".")
        if prefix not in blocks or not rest.split(".", 1)[0].isdigit():
            continue
        inner = rest.split(".", 1)[1]
        attention, modulation = blocks[prefix]
        if inner in attention or (preset == "attn-mlp" and inner not in modulation):
            chosen.add(name)
    return chosen
