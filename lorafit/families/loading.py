"""Load a base Stable Diffusion model (diffusers directory, hub id or single file) and name its family.

The family (SD1.x, SD2.x, SDXL) and the prediction type are read from the loaded parts, never
trusted to a user flag: a wrong "v2"/"v_parameterization" switch is the classic way to train a
LoRA against the wrong target in kohya. A flag may still override, for unusual merges.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.single_file_weights import settle_single_file_weights

log = logging.getLogger("lorafit.models")

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]
SourceKind = Literal["directory", "single_file", "hub_id"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only the SGM (SDXL) checkpoint layout has a second text-encoder embedder.
_SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders.1."

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """The frozen parts of a base model, with what lorafit detected about them."""

    family: Family
    prediction_type: PredictionType
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""


def resolve_model_source(source: str, key: str = "model.model") -> SourceKind:
    """Classify ``source`` cheaply (no weights read) and fail with one line if it cannot be a model.

    Args:
        source: Local diffusers directory, local single file, or a hub id like ``org/name``.
        key: Config key the value came from, named in error messages.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LorafitError(
                f"{key}: {source} is a directory but not a diffusers pipeline (no model_index.json); "
                "point it at a pipeline directory or at a .safetensors/.ckpt single file"
            )
        return "directory"
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise LorafitError(
                f"{key}: {source} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)} expected)"
            )
        return "single_file"
    looks_local = source.startswith(("/", ".", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if looks_local or not _HUB_ID.match(source):
        raise LorafitError(f"{key}: model path {source} does not exist; give an existing directory, file or hub id")
    return "hub_id"


def detect_family(unet_config, has_second_text_encoder: bool) -> Family:
    """Name the architecture from the UNet's config and the text encoders present.

    SDXL is the only family with a second text encoder and ``text_time`` micro-conditioning; SD2
    differs from SD1 by OpenCLIP's 1024-wide context and linear ``proj_in``/``proj_out``.
    """
    if has_second_text_encoder or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _pipeline_class(is_sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return any(k.startswith(_SDXL_SINGLE_FILE_PREFIX) for k in handle.keys())
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    return any(k.startswith(_SDXL_SINGLE_FILE_PREFIX) for k in load_single_file_checkpoint(str(path)))


def _load_pipeline(
    source: str, kind: SourceKind, single_file_config: str | None, revision: str | None, variant: str | None
):
    no_safety = dict(safety_checker=None, requires_safety_checker=False)
    if kind == "single_file":
        path = Path(source).expanduser()
        is_sdxl = _single_file_is_sdxl(path)
        cls = _pipeline_class(is_sdxl)
        kwargs = {} if is_sdxl else no_safety
        try:
            return cls.from_single_file(str(path), config=single_file_config, **kwargs)
        except (OSError, ValueError) as error:
            hint = (
                ""
                if single_file_config
                else (
                    "; offline, set model.single_file_config to a diffusers pipeline directory of the same "
                    "architecture (its configs are used, not its weights)"
                )
            )
            raise LorafitError(
                f"model.model: could not load single file {source}: {_first_line(error)}{hint}"
            ) from None
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source, revision=revision)
    except OSError as error:
        if kind == "hub_id":
            raise LorafitError(
                f"model.model: {source} is no local path, and as a hub id it is not in the local cache (HF_HOME) "
                f"and could not be downloaded ({_first_line(error)}); check the path or the network"
            ) from None
        raise LorafitError(f"model.model: could not read {source}: {_first_line(error)}") from None
    is_sdxl = "text_encoder_2" in index
    cls = _pipeline_class(is_sdxl)
    kwargs = {} if is_sdxl else no_safety
    return cls.from_pretrained(source, revision=revision, variant=variant, **kwargs)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_base_model(
    source: str,
    family: Family | None = None,
    prediction_type: PredictionType | None = None,
    single_file_config: str | None = None,
    weight_dtype: str = "float32",
    revision: str | None = None,
    variant: str | None = None,
) -> BaseModel:
    """Load ``source`` and return its frozen parts with the detected family and prediction type.

    Args:
        source: diffusers pipeline directory, hub id, or ``.safetensors``/``.ckpt`` single file.
        family: Override the detected family (``sd1``/``sd2``/``sdxl``).
        prediction_type: Override the scheduler's prediction type (``epsilon``/``v_prediction``).
        single_file_config: diffusers pipeline directory or hub id whose configs describe a single file.
        weight_dtype: dtype of the frozen weights (LoRA weights always stay float32).
        revision: Hub revision (branch, tag or commit).
        variant: Hub weight variant, e.g. ``fp16``.
    """
    kind = resolve_model_source(source)
    if weight_dtype not in DTYPES:
        raise LorafitError(f"model.weight_dtype: {weight_dtype!r} is not one of {', '.join(DTYPES)}")
    pipe = _load_pipeline(source, kind, single_file_config, revision, variant)
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    detected = detect_family(pipe.unet.config, len(text_encoders) > 1)
    if kind == "single_file":  # a tensor the file lacks would stay on the meta device
        settle_single_file_weights(pipe, detected, source)
    if family and family != detected:
        log.warning("model.family=%s overrides the detected family %s for %s", family, detected, source)
    scheduler_config = dict(pipe.scheduler.config)
    detected_prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type and prediction_type != detected_prediction:
        log.warning("model.prediction_type=%s overrides the scheduler's %s", prediction_type, detected_prediction)
    chosen_family = family or detected
    chosen_prediction = prediction_type or detected_prediction
    if chosen_prediction not in ("epsilon", "v_prediction"):
        raise LorafitError(f"model.prediction_type: {chosen_prediction!r} is not supported (epsilon or v_prediction)")
    dtype = DTYPES[weight_dtype]
    for module in [pipe.unet, pipe.vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
        if module.dtype != dtype:  # diffusers warns on any .to(dtype), even a no-op
            module.to(dtype)
    log.info(
        "loaded %s from %s: family %s, prediction %s", type(pipe).__name__, source, chosen_family, chosen_prediction
    )
    return BaseModel(
        family=chosen_family,
        prediction_type=chosen_prediction,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        source=source,
    )
