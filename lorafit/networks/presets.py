"""Which modules a network trains: presets by block type, plus include/exclude regexes.

The presets pick modules the way kohya and LyCORIS do, by the class of the block they sit in, so
they mean the same on SD1, SD2 and SDXL (and on the tiny test models):

- ``attn``: the attention projections ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
  transformer block (self- and cross-attention). lorafit's default; what diffusers' examples train.
- ``attn-mlp``: every Linear and 1x1 conv inside ``Transformer2DModel`` blocks — attention,
  feed-forward (``ff.net.0.proj``, ``ff.net.2``) and ``proj_in``/``proj_out``. kohya's default
  ``networks.lora`` targets.
- ``full``: ``attn-mlp`` plus every Linear/conv of ``ResnetBlock2D``, ``Downsample2D`` and
  ``Upsample2D`` blocks, ``conv_in``, ``conv_out`` and the time embedding. LyCORIS's ``full`` preset.

Network type ``locon`` adds the ResNet/Down/Upsample blocks to ``attn``/``attn-mlp``, as kohya's
``networks.lora`` does once ``conv_dim`` is set. Regexes follow PEFT's ``rank_pattern`` rule: a
pattern matches a module whose full name equals it or ends in ``.`` + it (``ff\\.net\\.2``,
``up_blocks\\.0\\..*``, ``conv_in``).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from lorafit.errors import LorafitError

TargetPreset = Literal["attn", "attn-mlp", "full"]
TARGET_PRESETS = ("attn", "attn-mlp", "full")

_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_FULL_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def matches(pattern: str, name: str) -> bool:
    """PEFT's pattern rule: ``name`` is ``pattern`` or ends in ``.`` + ``pattern`` (regex, full match)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _check_regexes(patterns: list[str], key: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise LorafitError(f"{key}: {pattern!r} is not a valid regex ({error})") from None


def adaptable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of ``model`` by name (never inside an existing PEFT adapter)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name and ".base_layer" not in name
    }


def _inside(model: torch.nn.Module, class_names: tuple[str, ...]) -> set[str]:
    """Names of the Linear/Conv2d modules that sit inside a block of one of ``class_names``."""
    found: set[str] = set()
    for block_name, block in model.named_modules():
        if type(block).__name__ in class_names:
            for name, module in block.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    found.add(f"{block_name}.{name}" if name else block_name)
    return found


def preset_modules(unet: torch.nn.Module, preset: TargetPreset, with_conv_blocks: bool = False) -> set[str]:
    """Module names the UNet ``preset`` selects; ``with_conv_blocks`` adds ResNet/Down/Upsample (LoCon)."""
    if preset not in TARGET_PRESETS:
        raise LorafitError(f"model.target_preset: {preset!r} is not one of {', '.join(TARGET_PRESETS)}")
    transformer = _inside(unet, _TRANSFORMER_BLOCKS)
    if preset == "attn":
        names = {n for n in transformer if n.endswith(tuple(f".{p}" for p in _ATTENTION_PROJECTIONS))}
    else:
        names = set(transformer)
    if preset == "full" or with_conv_blocks:
        names |= _inside(unet, _CONV_BLOCKS)
    if preset == "full":
        names |= {n for n in adaptable_modules(unet) if n in _FULL_NAMES}
    return names


def select_modules(
    model: torch.nn.Module,
    base: set[str] | list[str] | str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    key: str = "model",
) -> dict[str, torch.nn.Module]:
    """The Linear/Conv2d modules to adapt: ``base`` (names from a preset, name suffixes, or one full-match
    regex as PEFT reads ``target_modules``), plus ``include`` regexes, minus ``exclude`` regexes.

    An empty result is an error naming ``key``: a typo in a regex must not train nothing.
    """
    include, exclude = list(include or []), list(exclude or [])
    _check_regexes(include, f"{key}.include")
    _check_regexes(exclude, f"{key}.exclude")
    candidates = adaptable_modules(model)
    if isinstance(base, str):
        _check_regexes([base], key)
        chosen = {n for n in candidates if re.fullmatch(base, n)}
    elif isinstance(base, set):
        chosen = base & set(candidates)
    else:  # suffix list, PEFT's reading of a target_modules list
        chosen = {n for n in candidates if any(n == s or n.endswith(f".{s}") for s in base)}
    chosen |= {n for n in candidates if any(matches(p, n) for p in include)}
    chosen -= {n for n in chosen if any(matches(p, n) for p in exclude)}
    if not chosen:
        raise LorafitError(
            f"{key}: no module of {type(model).__name__} is selected (check the preset, "
            f"target modules and include/exclude regexes)"
        )
    return {name: candidates[name] for name in sorted(chosen)}


def is_spatial_conv(module: torch.nn.Module) -> bool:
    """A conv with a kernel larger than 1x1: these take ``conv_rank``/``conv_alpha`` (kohya's ``conv_dim``)."""
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
