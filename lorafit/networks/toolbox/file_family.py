"""Which model family a network file is for, from its metadata and key names alone (no base model).

kohya and lorafit record the base in ``ss_base_model_version`` (``sd_v1``, ``sd_v2``,
``sdxl_base_v1-0``, ``flux1``) and SAI's ``modelspec.architecture``; files without them are told
apart by their names: BFL block names (``double_blocks``) or a ``transformer`` component are Flux,
SGM block names (``input_blocks``), ``lora_te1``/``lora_te2`` or ``text_encoder_2`` are SDXL,
diffusers block names (``down_blocks``) are SD1/SD2. SD2 differs from SD1 by a 1024-wide text
context and linear ``proj_in``/``proj_out``; when the file shows neither, SD1 is the guess, which
changes nothing a verb writes (the two share every name) and is marked as a guess by ``inspect``.
"""

from __future__ import annotations

import re

_VERSIONS = (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("flux", "flux"))
_ARCHITECTURES = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("flux", "flux"),
)
_FLUX_NAMES = re.compile(r"(double_blocks|single_blocks|transformer_blocks_\d+_ff_context|^transformer\.)")
_SDXL_NAMES = re.compile(r"^(lora_unet_(input_blocks|output_blocks|middle_block)_|lora_te[12]_|text_encoder_2\.)")


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = str(metadata.get("ss_base_model_version", ""))
    for prefix, family in _VERSIONS:
        if version.startswith(prefix):
            return family
    architecture = str(metadata.get("modelspec.architecture", ""))
    for prefix, family in _ARCHITECTURES:
        if architecture.startswith(prefix):
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def _family_from_shapes(keys_and_shapes: dict[str, tuple]) -> str | None:
    """The cross-attention context width (2048 SDXL, 1024 SD2), else linear (2-D) proj_in/proj_out (SD2;
    SDXL's are linear too, but an SDXL file without SGM names or a second text encoder is rare)."""
    downs = {k: s for k, s in keys_and_shapes.items() if k.endswith(("lora_down.weight", "lora_A.weight"))}
    for key, shape in downs.items():
        if re.search(r"attn2[._]to_[kv]", key) and shape[-1] in (1024, 2048):
            return "sdxl" if shape[-1] == 2048 else "sd2"
    if any(re.search(r"proj_(in|out)", key) and len(shape) == 2 for key, shape in downs.items()):
        return "sd2"
    return None


def guess_family(keys: list[str], metadata: dict[str, str], shapes: dict[str, tuple] | None = None) -> str:
    """The family of a network file: recorded in its metadata, or else judged from its names."""
    recorded = family_from_metadata(metadata)
    if recorded:
        return recorded
    if any(_FLUX_NAMES.search(k) for k in keys):
        return "flux"
    if any(_SDXL_NAMES.search(k) for k in keys):
        return "sdxl"
    return (_family_from_shapes(shapes) if shapes else None) or "sd1"


def family_is_guessed(keys: list[str], metadata: dict[str, str]) -> bool:
    """True when neither metadata nor an unambiguous name says the family (an SD1/SD2 file without records)."""
    if family_from_metadata(metadata):
        return False
    return not any(_FLUX_NAMES.search(k) or _SDXL_NAMES.search(k) for k in keys)
