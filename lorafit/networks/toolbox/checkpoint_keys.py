"""Where a diffusers module's weight lives in a single-file checkpoint (A1111/ComfyUI's layout).

Single files keep each model under its original code's names (see
:mod:`lorafit.families.original_checkpoint`): the UNet under ``model.diffusion_model.`` with SGM
block numbers, CLIP-L text encoders in transformers' layout, OpenCLIP ones (SD2, SDXL's second)
with q/k/v fused into one ``in_proj_weight``, and Flux's transformer in BFL's layout with fused
``qkv``/``linear1`` and the final modulation's halves swapped. A :class:`Location` says which
tensor holds a module's weight and which of its rows: merging a LoRA into such a file and
extracting one from it then read and write just those rows, one tensor at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.families.original_checkpoint import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_PREFIXES, UNET_PREFIX
from lorafit.families.original_layout import unet_module_to_original

# Each a (start in the checkpoint tensor, start in the module's weight, rows): the module's rows,
# in order, may come from several places (Flux's swapped halves).
Segments = tuple[tuple[int, int, int], ...]

_OPEN_CLIP_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


@dataclass(frozen=True)
class Location:
    """A module's weight inside a checkpoint: the tensor ``key`` and, when the tensor is shared with
    other modules (fused), the ``segments`` of its rows that are this module's."""

    key: str
    segments: Segments | None = None
    rows: int | None = None  # the module's own rows, when ``segments`` are given

    def describe(self) -> str:
        return self.key if self.segments is None else f"{self.key} (rows of a fused tensor)"


def _clip(prefix: str, module: str) -> Location:
    name = module if module.startswith("text_model.") else f"text_model.{module}"
    return Location(f"{prefix}{name}.weight")


def _open_clip(prefix: str, module: str, width: int) -> Location:
    match = _OPEN_CLIP_LAYER.match(module)
    if match:
        layer, part = match.groups()
        if part in _QKV:
            start = _QKV[part] * width
            return Location(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_weight", ((start, 0, width),), width)
        if part in _OPEN_CLIP_PARTS:
            return Location(f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_PARTS[part]}.weight")
    raise LorafitError(f"text encoder module {module} has no place in the OpenCLIP single-file layout")


def _flux(module: str, config, prefix: str) -> Location:
    from lorafit.families.flux_layout import diffusers_to_bfl

    found = diffusers_to_bfl(config).get(module)
    if found is None:
        raise LorafitError(f"Flux transformer module {module} has no BFL name")
    kohya_module, index = found
    rows = [count for _, count in kohya_module.parts]
    key = f"{prefix}{kohya_module.path}.weight"
    if kohya_module.swap_halves:  # diffusers' rows are BFL's two halves swapped
        half = rows[0] // 2
        return Location(key, ((half, 0, half), (0, half, half)), rows[0])
    if not kohya_module.fused:
        return Location(key)
    start = sum(rows[:index])
    return Location(key, ((start, 0, rows[index]),), rows[index])


def checkpoint_location(family: str, component: str, module: str, configs: dict, prefix: str = "") -> Location:
    """The :class:`Location` of ``component``'s ``module`` in a ``family`` single file.

    Args:
        family: ``sd1``, ``sd2``, ``sdxl`` or ``flux``.
        component: ``unet``/``transformer``, ``text_encoder``, ``text_encoder_2``.
        module: The module's diffusers/transformers name.
        configs: The components' configs (the denoiser's, and the text encoders' for their widths).
        prefix: Flux only: ``model.diffusion_model.`` when the file bundles other parts, else empty.
    """
    if family == "flux":
        if component != "transformer":
            raise LorafitError(
                f"a FLUX.1 single file holds the transformer only, not the {component} this LoRA also changes; "
                "merge into the diffusers directory instead, or leave it out with --text_encoders false"
            )
        return _flux(module, configs["transformer"], prefix)
    if component == "unet":
        return Location(f"{UNET_PREFIX}{unet_module_to_original(module, configs['unet'])}.weight")
    width = int(getattr(configs.get(component), "hidden_size", 0) or 0)
    if family == "sd1" and component == "text_encoder":
        return _clip(SD1_TEXT_PREFIX, module)
    if family == "sd2" and component == "text_encoder":
        return _open_clip(SD2_TEXT_PREFIX, module, width)
    if family == "sdxl" and component == "text_encoder":
        return _clip(SDXL_TEXT_PREFIXES[0], module)
    if family == "sdxl" and component == "text_encoder_2":
        return _open_clip(SDXL_TEXT_PREFIXES[1], module, width)
    raise LorafitError(f"a {family} single file has no component {component!r}")
