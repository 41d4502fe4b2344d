"""FLUX.1 from the single files people download: BFL's transformer file plus separate parts.

``flux1-dev.safetensors`` (BFL's layout, also fine-tunes and fp8 copies such as
``flux1-dev-fp8.safetensors``) holds the transformer only; the VAE (``ae.safetensors``) and the
text encoders (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``) come as separate files, as
ComfyUI and Forge users keep them. ``model.parts`` names those files by diffusers component; a
part not given is read from ``model.single_file_config`` (a diffusers FLUX.1 directory or cached
hub id), which also supplies the configs, tokenizers and scheduler. diffusers reads the
transformer and VAE files (``from_single_file``); the text-encoder files are transformers'
own layout, so their state dicts load into the configured model classes directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.models")

_PARTS = ("vae", "text_encoder", "text_encoder_2")
_HINT = (
    "set model.single_file_config to a diffusers FLUX.1 directory (or a cached hub id such as "
    "black-forest-labs/FLUX.1-dev), or give the file in model.parts"
)


def _need_config(config: str | None, what: str) -> str:
    if not config:
        raise LorafitError(f"model.single_file_config: a Flux single file needs the {what} of FLUX.1; {_HINT}")
    return config


def _read(path: str, key: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise LorafitError(f"model.parts.{key}: {path} does not exist")
    try:
        return load_file(str(file))
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise LorafitError(f"model.parts.{key}: {path} is not a readable .safetensors file ({error})") from None


def _text_encoder_from_file(name: str, path: str, config: str, dtype: torch.dtype):
    """CLIP-L / T5 from a transformers-layout file (ComfyUI's ``clip_l`` / ``t5xxl_*`` files).

    transformers' own ``from_pretrained`` reads it, from a temporary folder holding the config and
    a link to the file: it knows the key renames between its versions (CLIP's ``text_model.``
    level), T5's tied embeddings and the dtype casts, which a hand-written loader would repeat.
    """
    import os
    import tempfile

    from safetensors import safe_open
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise LorafitError(f"model.parts.{name}: {path} does not exist")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise LorafitError(f"model.parts.{name}: {path} is not a readable .safetensors file ({error})") from None
    if any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in keys):
        raise LorafitError(f"model.parts.{name}: {path} is a 'scaled fp8' file; use the fp16 or plain fp8 one")
    model_class = CLIPTextModel if name == "text_encoder" else T5EncoderModel
    with tempfile.TemporaryDirectory(prefix="lorafit-part-") as folder:
        AutoConfig.from_pretrained(config, subfolder=name).save_pretrained(folder)
        os.symlink(file, Path(folder) / "model.safetensors")
        try:
            model = model_class.from_pretrained(folder, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LorafitError(
                f"model.parts.{name}: {path} is no {model_class.__name__} of this size ({first})"
            ) from None
    return model.eval()


def _transformer_of_other_width(path: str, config: dict, dtype: torch.dtype, quantization: str):
    """diffusers' BFL reader only knows the released width; other sizes use lorafit's table."""
    from diffusers import FluxTransformer2DModel

    from lorafit.families.flux_layout import diffusers_state_dict

    if quantization in ("nf4", "int8"):
        raise LorafitError(f"model.quantization: {quantization} needs a FLUX.1 of the released width (3072)")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    try:
        state = diffusers_state_dict(_read(path, "model"), config)
    except ValueError as error:
        raise LorafitError(f"model.model: {path} does not fit the FLUX.1 config given ({error})") from None
    transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return transformer


def load_flux_single_file(path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
    """A ``FluxPipeline`` from BFL's transformer file, ``parts`` files and ``config`` (see module docstring)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer

    unknown = sorted(set(parts) - set(_PARTS))
    if unknown:
        raise LorafitError(f"model.parts: {unknown[0]!r} is no Flux component; give {', '.join(_PARTS)}")
    config = _need_config(config, "configs and tokenizers")
    kwargs = {}
    if quantization in ("nf4", "int8"):
        from diffusers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            if quantization == "nf4"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    transformer_config = FluxTransformer2DModel.load_config(config, subfolder="transformer")
    width = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    if width == 3072:  # the released FLUX.1 models: diffusers' reader (it handles quantization too)
        transformer = FluxTransformer2DModel.from_single_file(
            path, config=config, subfolder="transformer", torch_dtype=dtype, **kwargs
        )
    else:
        transformer = _transformer_of_other_width(path, transformer_config, dtype, quantization)
    components = {"transformer": transformer}
    if "vae" in parts:
        _read(parts["vae"], "vae")  # one-line error for a missing or broken file
        components["vae"] = AutoencoderKL.from_single_file(
            parts["vae"], config=config, subfolder="vae", torch_dtype=dtype
        )
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            components[name] = _text_encoder_from_file(name, parts[name], config, dtype)
    for name in ("tokenizer", "tokenizer_2"):
        components[name] = AutoTokenizer.from_pretrained(config, subfolder=name)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler")
    given = sorted(set(_PARTS) - set(parts))
    if given:
        log.info("Flux single file: %s from %s", ", ".join(given), config)
    try:  # the parts not given as files come from the diffusers directory, with their weights
        return FluxPipeline.from_pretrained(config, torch_dtype=dtype, **components)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LorafitError(
            f"model.parts: {', '.join(given)} of {path} could not be read from {config} ({first}); give the "
            f"files in model.parts (e.g. vae: ae.safetensors, text_encoder: clip_l.safetensors, "
            f"text_encoder_2: t5xxl_fp16.safetensors)"
        ) from None
