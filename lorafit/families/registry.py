"""The model families lorafit trains, and how a model is recognised as one of them.

Adding a family is one module with a :class:`~lorafit.families.family.Family` subclass and one line
in :data:`_FAMILY_CLASSES` (see docs/families.md). Order matters only for detection: the first
family whose ``matches_*`` accepts a model wins, so more specific families come first.
"""

from __future__ import annotations

import importlib

from lorafit.errors import LorafitError
from lorafit.families.family import Family

# name -> "module:class"; imported on first use (a family module may import diffusers classes).
_FAMILY_CLASSES: dict[str, str] = {
    "sdxl": "lorafit.families.sdxl:SDXLFamily",
    "sd2": "lorafit.families.sd:SD2Family",
    "sd1": "lorafit.families.sd:SD1Family",
    "flux": "lorafit.families.flux:FluxFamily",
    "qwen-image": "lorafit.families.qwen_image:QwenImageFamily",
    "z-image": "lorafit.families.z_image:ZImageFamily",
    "flux2-klein": "lorafit.families.flux2:Flux2KleinFamily",
    "chroma": "lorafit.families.chroma:ChromaFamily",
    "sd3": "lorafit.families.sd3:SD3Family",
}
_INSTANCES: dict[str, Family] = {}


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILY_CLASSES)


def get_family(name: str, key: str = "model.family") -> Family:
    """The :class:`Family` called ``name`` (one-line error naming ``key`` for an unknown one)."""
    if name not in _FAMILY_CLASSES:
        raise LorafitError(f"{key}: unknown model family {name!r}; lorafit knows {', '.join(_FAMILY_CLASSES)}")
    if name not in _INSTANCES:
        module_name, class_name = _FAMILY_CLASSES[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(module_name), class_name)()
    return _INSTANCES[name]


def all_families() -> list[Family]:
    return [get_family(name) for name in _FAMILY_CLASSES]


def detect_from_index(index: dict, denoiser_config: dict, source: str) -> Family:
    """The family of a diffusers pipeline from its ``model_index.json`` and its denoiser's config."""
    for family in all_families():
        if family.matches_index(index, denoiser_config):
            return family
    pipeline = index.get("_class_name", "an unknown pipeline")
    raise LorafitError(
        f"model.model: {source} is a {pipeline}, which lorafit does not train (families: "
        f"{', '.join(f.title for f in all_families())}); see docs/families.md"
    )


def detect_from_keys(keys: set[str], source: str) -> Family:
    """The family of a single checkpoint file from its tensor names (no tensor is read)."""
    for family in all_families():
        if family.matches_single_file(keys):
            return family
    sample = ", ".join(sorted(keys)[:3])
    single = [f.title for f in all_families() if any("single file" in form for form in f.load_formats)]
    raise LorafitError(
        f"model.model: {source} is no checkpoint of a family lorafit knows (first keys: {sample}); "
        f"give a diffusers directory, or a single file of {', '.join(single)}"
    )


def family_of_denoiser(denoiser) -> Family:
    """The family whose denoiser ``denoiser`` is, judged as from a pipeline holding only it."""
    config = dict(getattr(denoiser, "config", {}))
    for family in all_families():
        index = {family.denoiser_component: ["diffusers", type(denoiser).__name__]}
        if family.matches_index(index, config):
            return family
    raise LorafitError(f"{type(denoiser).__name__} is the denoiser of no family lorafit knows")
