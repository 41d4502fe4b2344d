"""Transformer families from the single files people download: the transformer file plus separate parts.

ComfyUI users keep the transformer families as one file per part
(``diffusion_models/qwen_image_bf16.safetensors``, ``text_encoders/qwen_2.5_vl_7b.safetensors``,
``vae/qwen_image_vae.safetensors``). The transformer file is read by diffusers' own ``from_single_file``
(which converts ComfyUI's/BFL's names, e.g. Z-Image's fused ``attention.qkv``); ``model.parts`` names the
other files by diffusers component, and every part not given (with the configs, tokenizer and scheduler)
comes from ``model.single_file_config``, a diffusers directory or cached hub id of the same model.
A text-encoder file is transformers' own layout, read by transformers' ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.models")

_PARTS = ("vae", "text_encoder")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _checked_file(path: str, key: str) -> Path:
    from safetensors import safe_open

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise LorafitError(f"{key}: {path} does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise LorafitError(f"{key}: {path} is not a readable .safetensors file ({error})") from None
    if any(k.endswith((".scale_weight", ".weight_scale")) or k == "scaled_fp8" for k in keys):
        raise LorafitError(f"{key}: {path} is a 'scaled fp8' file; use the bf16 or plain fp8 one")
    return file


def _text_encoder_from_file(path: str, config: str, class_name: str, dtype: torch.dtype):
    """The text encoder from a transformers-layout file, through transformers' ``from_pretrained`` on a
    folder holding the config and a link to the file (it knows its own key renames and tied weights)."""
    import transformers

    file = _checked_file(path, "model.parts.text_encoder")
    model_class = getattr(transformers, class_name)
    with tempfile.TemporaryDirectory(prefix="lorafit-part-") as folder:
        transformers.AutoConfig.from_pretrained(config, subfolder="text_encoder").save_pretrained(folder)
        os.symlink(file, Path(folder) / "model.safetensors")
        try:
            model = model_class.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            raise LorafitError(
                f"model.parts.text_encoder: {path} is no {class_name} of this size ({_first_line(error)})"
            ) from None
    return model.eval()


def read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file (one-line error naming ``key`` for a missing or broken one)."""
    from safetensors.torch import load_file

    return load_file(str(_checked_file(path, key)))


def load_transformer_single_file(family, path, config, parts, quantization, dtype, vae_file: bool, other_width=None):
    """``family``'s pipeline from its transformer file ``path``, ``parts`` files and ``config`` (see the
    module docstring). ``vae_file``: whether the installed diffusers reads the family's VAE as a single file.
    ``other_width(path, config, dtype, quantization)``: the transformer where diffusers' reader cannot build
    it (a width it hard-codes), else None."""
    import diffusers
    from diffusers import DiffusionPipeline

    unknown = sorted(set(parts) - set(_PARTS))
    if unknown:
        raise LorafitError(f"model.parts: {unknown[0]!r} is no {family.title} part; give {', '.join(_PARTS)}")
    if not config:
        raise LorafitError(
            f"model.single_file_config: a {family.title} single file needs the configs and tokenizer of its "
            "diffusers pipeline; set it to a diffusers directory or a cached hub id of the same model"
        )
    if "vae" in parts and not vae_file:
        raise LorafitError(
            f"model.parts.vae: diffusers {diffusers.__version__} cannot read a {family.title} VAE single file; "
            "leave it out (the VAE then comes from model.single_file_config)"
        )
    index = DiffusionPipeline.load_config(config)
    kwargs = {}
    if quantization in ("nf4", "int8"):
        kwargs["quantization_config"] = diffusers.BitsAndBytesConfig(
            **(
                dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
                if quantization == "nf4"
                else dict(load_in_8bit=True)
            )
        )
    transformer_class = getattr(diffusers, index["transformer"][1])
    transformer = other_width(path, config, dtype, quantization) if other_width else None
    if transformer is None:
        transformer = transformer_class.from_single_file(
            path, config=config, subfolder="transformer", dtype=dtype, **kwargs
        )
    components = {"transformer": transformer}
    if "vae" in parts:
        _checked_file(parts["vae"], "model.parts.vae")
        vae_class = getattr(diffusers, index["vae"][1])
        components["vae"] = vae_class.from_single_file(parts["vae"], config=config, subfolder="vae", dtype=dtype)
    if "text_encoder" in parts:
        components["text_encoder"] = _text_encoder_from_file(
            parts["text_encoder"], config, index["text_encoder"][1], dtype
        )
    given = sorted(set(_PARTS) - set(parts))
    if given:
        log.info("%s single file: %s from %s", family.title, ", ".join(given), config)
    try:  # the parts not given as files come from the diffusers directory, with their weights
        return family.pipeline_type().from_pretrained(config, dtype=dtype, **components)
    except (OSError, ValueError) as error:
        raise LorafitError(
            f"model.parts: {', '.join(given)} of {path} could not be read from {config} ({_first_line(error)}); "
            "give them in model.parts"
        ) from None
