"""Load a base model (diffusers directory, hub id or single file) and name its family.

The family (SD1.x, SD2.x, SDXL, Flux.1, ...) and the prediction type are read from the model,
never trusted to a user flag: a wrong "v2"/"v_parameterization" switch is the classic way to train
a LoRA against the wrong target in kohya. A flag may still override, for unusual merges. What
differs between families (pipeline class, components, single-file layout) is asked of the family
(:mod:`lorafit.families.registry`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import BaseModel, Family
from lorafit.families.registry import detect_from_index, detect_from_keys, get_family
from lorafit.families.single_file_weights import settle_single_file_weights
from lorafit.io.optional_imports import BITSANDBYTES, allow_import

log = logging.getLogger("lorafit.models")

PredictionType = Literal["epsilon", "v_prediction"]
Quantization = Literal["none", "nf4", "int8", "fp8"]
SourceKind = Literal["directory", "single_file", "hub_id"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def detect_family(unet_config, has_second_text_encoder: bool) -> str:
    """Name a UNet family from the UNet's config and the text encoders present (no weights read).

    SDXL is the only one with a second text encoder and ``text_time`` micro-conditioning; SD2
    differs from SD1 by OpenCLIP's 1024-wide context and linear ``proj_in``/``proj_out``.
    """
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    if has_second_text_encoder:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    return detect_from_index(index, dict(unet_config), "the model").name


def single_file_keys(path: Path) -> set[str]:
    """Tensor names of a checkpoint file (safetensors: from the header alone)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return set(handle.keys())
        except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
            raise LorafitError(f"model.model: {path} is not a readable .safetensors file ({error})") from None
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    return set(load_single_file_checkpoint(str(path)))


def _component_config(source: str, component: str, revision: str | None) -> dict:
    """A pipeline component's ``config.json`` (local or from the hub cache), without building it."""
    from diffusers.configuration_utils import ConfigMixin

    class _ComponentConfig(ConfigMixin):  # ConfigMixin reads only for a class naming its file
        config_name = "config.json"

    return dict(_ComponentConfig.load_config(source, subfolder=component, revision=revision))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def quantization_config(quantization: str, family: Family, compute_dtype: torch.dtype):
    """diffusers' ``PipelineQuantizationConfig`` putting the denoiser in bitsandbytes NF4/int8, or None.

    Only the denoiser is quantized: it is most of the memory (Flux's transformer is 12 B of its
    17 B parameters), and PEFT wraps LoRA around bitsandbytes' ``Linear4bit``/``Linear8bitLt``.
    """
    if quantization in ("none", "fp8"):
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    # The CLI keeps bitsandbytes unimportable until something asks for it (its import prints library
    # noise on every verb): a quantized base is such a request.
    allow_import(BITSANDBYTES)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LorafitError(
            f"model.quantization: {quantization} needs bitsandbytes; pip install 'lorafit[bnb]'"
        ) from None
    if quantization == "nf4":
        backend, kwargs = (
            "bitsandbytes_4bit",
            dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype),
        )
    else:
        backend, kwargs = "bitsandbytes_8bit", dict(load_in_8bit=True)
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=[family.denoiser_component]
    )


@contextlib.contextmanager
def loading_bars_off():
    """Without diffusers' "Loading pipeline components" and transformers' "Loading weights" bars.

    Both are tqdm lines on stderr for a load of seconds, between lorafit's own log lines (which say
    what was loaded). Downloads keep huggingface_hub's bars: transformers' switch turns those off too,
    so they are turned back on at once (unless HF_HUB_DISABLE_PROGRESS_BARS asks otherwise).
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    states = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    hub_was_on = not are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if hub_was_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if states[0]:
            diffusers_logging.enable_progress_bar()
        if states[1]:
            transformers_logging.enable_progress_bar()


def _load_pipeline(source, kind, single_file_config, revision, variant, parts, quantization, dtype):
    if kind == "single_file":
        path = Path(source).expanduser()
        family = detect_from_keys(single_file_keys(path), source)
        try:
            pipe = family.load_single_file(str(path), single_file_config, dict(parts), quantization, dtype)
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
        return family, pipe
    if parts:
        raise LorafitError(f"model.parts: only for single files; {source} is a {kind.replace('_', ' ')}")
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
    denoiser = next((c for c in ("unet", "transformer") if c in index), None)
    config = _component_config(source, denoiser, revision) if denoiser else {}
    family = detect_from_index(index, config, source)
    try:
        return family, family.load_pretrained(
            source, revision, variant, quantization_config(quantization, family, dtype)
        )
    except RuntimeError as error:
        if "GPU is needed for quantization" in str(error):  # diffusers' bitsandbytes quantizer
            raise LorafitError(
                f"model.quantization: {quantization} needs a CUDA GPU (bitsandbytes quantizes on it); use fp8 or "
                "none on this machine"
            ) from None
        raise


def model_skeleton(source: str, key: str = "--base") -> tuple[str, dict[str, torch.nn.Module]]:
    """The family and the denoiser/text-encoder modules of ``source`` on the meta device (no weights).

    Module names, shapes and configs are all a LoRA's names and shapes depend on, so converting or
    checking a file against a base costs no memory even for Flux. A single-file base has no
    separate configs to read, so it is loaded for real.
    """
    if resolve_model_source(source, key=key) == "single_file":
        loaded = load_base_model(source)
        spec = get_family(loaded.family)
        components = {spec.denoiser_component: loaded.denoiser}
        components.update(zip(spec.text_encoder_components, loaded.text_encoders))
        return loaded.family, components
    import importlib

    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source)
    denoiser = next((c for c in ("unet", "transformer") if c in index), None)
    spec = detect_from_index(index, _component_config(source, denoiser, None) if denoiser else {}, source)
    components = {}
    with torch.device("meta"):
        for name in (spec.denoiser_component, *spec.text_encoder_components):
            library, class_name = (index.get(name) or [None, None])[:2]
            if library is None:
                continue
            cls = getattr(importlib.import_module(library), class_name)
            if library == "diffusers":
                components[name] = cls.from_config(cls.load_config(source, subfolder=name))
            else:
                components[name] = cls(cls.config_class.from_pretrained(source, subfolder=name))
    return spec.name, components


def load_base_model(
    source: str,
    family: str | None = None,
    prediction_type: PredictionType | None = None,
    single_file_config: str | None = None,
    weight_dtype: str = "float32",
    revision: str | None = None,
    variant: str | None = None,
    parts: dict[str, str] | None = None,
    quantization: Quantization = "none",
) -> BaseModel:
    """Load ``source`` and return its frozen parts with the detected family and prediction type.

    Args:
        source: diffusers pipeline directory, hub id, or ``.safetensors``/``.ckpt`` single file.
        family: Override the detected family (``sd1``/``sd2``/``sdxl``/``flux``).
        prediction_type: Override the scheduler's prediction type (``epsilon``/``v_prediction``).
        single_file_config: diffusers pipeline directory or hub id whose configs describe a single file.
        weight_dtype: dtype of the frozen weights (LoRA weights always stay float32).
        revision: Hub revision (branch, tag or commit).
        variant: Hub weight variant, e.g. ``fp16``.
        parts: Single files only: separately downloaded components by diffusers name (``vae``,
            ``text_encoder``, ``text_encoder_2``), e.g. Flux's ``ae.safetensors`` and text encoders.
        quantization: Storage of the frozen denoiser: ``none``, ``nf4``/``int8`` (bitsandbytes,
            through diffusers' quantization config) or ``fp8`` (float8 storage, upcast per layer).
    """
    kind = resolve_model_source(source)
    if weight_dtype not in DTYPES:
        raise LorafitError(f"model.weight_dtype: {weight_dtype!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[weight_dtype]
    with loading_bars_off():
        spec, pipe = _load_pipeline(
            source, kind, single_file_config, revision, variant, parts or {}, quantization, dtype
        )
    if family and family != spec.name:
        log.warning("model.family=%s overrides the detected family %s for %s", family, spec.name, source)
        spec = get_family(family)
    if kind == "single_file" and spec.objective == "ddpm":  # a tensor the file lacks would stay on the meta device
        settle_single_file_weights(pipe, spec.name, source)
    denoiser = getattr(pipe, spec.denoiser_component)
    text_encoders = [getattr(pipe, c) for c in spec.text_encoder_components if getattr(pipe, c, None) is not None]
    tokenizers = [getattr(pipe, c) for c in spec.tokenizer_components if getattr(pipe, c, None) is not None]
    scheduler_config = dict(pipe.scheduler.config)
    detected_prediction = spec.prediction_type(scheduler_config)
    if prediction_type and prediction_type != detected_prediction:
        if spec.objective == "flow":
            raise LorafitError(f"model.prediction_type: {spec.title} is a flow-matching model; leave it empty")
        log.warning("model.prediction_type=%s overrides the scheduler's %s", prediction_type, detected_prediction)
    chosen_prediction = prediction_type or detected_prediction
    if chosen_prediction not in ("epsilon", "v_prediction", "flow"):
        raise LorafitError(f"model.prediction_type: {chosen_prediction!r} is not supported (epsilon or v_prediction)")
    quantized = quantization in ("nf4", "int8")
    for module in [denoiser, pipe.vae, *text_encoders]:
        module.requires_grad_(False)
        module.eval()
        if module is denoiser and quantized:
            continue  # bitsandbytes layers keep their storage; compute runs in bnb_4bit_compute_dtype
        if module.dtype != dtype:  # diffusers warns on any .to(dtype), even a no-op
            module.to(dtype)
    if quantization == "fp8":
        # Weights stored in float8 and upcast layer by layer as they run (diffusers' layerwise
        # casting): half of bf16's memory for the frozen denoiser. Done before any LoRA is
        # attached, so adapter weights are never cast.
        denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    log.info("loaded %s from %s: family %s, prediction %s", type(pipe).__name__, source, spec.name, chosen_prediction)
    return BaseModel(
        family=spec.name,
        prediction_type=chosen_prediction,
        denoiser=denoiser,
        vae=pipe.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        source=source,
        compute_dtype=dtype if quantization != "none" else None,
        pipeline_config={k: v for k, v in pipe.config.items() if not k.startswith("_") and not isinstance(v, list)},
    )
