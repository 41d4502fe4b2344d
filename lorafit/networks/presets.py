"""Which modules a network trains: the family's presets, plus include/exclude regexes.

Each family defines what its presets select (``attn``, ``attn-mlp``, ``full``): for the UNet
families see :mod:`lorafit.families.unet`, for Flux :meth:`lorafit.families.flux.FluxFamily.preset_modules`.
Regexes follow PEFT's ``rank_pattern`` rule: a
pattern matches a module whose full name equals it or ends in ``.`` + it (``ff\\.net\\.2``,
``up_blocks\\.0\\..*``, ``conv_in``).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import adaptable_modules

TargetPreset = Literal["attn", "attn-mlp", "full"]
TARGET_PRESETS = ("attn", "attn-mlp", "full")


def matches(pattern: str, name: str) -> bool:
    """PEFT's pattern rule: ``name`` is ``pattern`` or ends in ``.`` + ``pattern`` (regex, full match)."""
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _check_regexes(patterns: list[str], key: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise LorafitError(f"{key}: {pattern!r} is not a valid regex ({error})") from None


def preset_modules(denoiser: torch.nn.Module, preset: TargetPreset, with_conv_blocks: bool = False) -> set[str]:
    """Module names of ``denoiser`` a preset selects, by its family's rules (``with_conv_blocks``: LoCon)."""
    from lorafit.families.registry import family_of_denoiser

    return family_of_denoiser(denoiser).preset_modules(denoiser, preset, with_conv_blocks)


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
