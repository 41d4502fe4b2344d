"""Metadata written into kohya-format LoRA files: kohya's ``ss_*`` keys and SAI ``modelspec.*`` keys.

A1111's LoRA tab, ComfyUI and civitai read these to show the base model, resolution, rank and
the caption tags a LoRA was trained with, so we fill the ones kohya fills, with the same meaning.
Every value is a string (safetensors metadata is ``dict[str, str]``).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field

from lorafit import __version__
from lorafit.families.registry import get_family

_IMPLEMENTATION = {
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "flux": "https://github.com/black-forest-labs/flux",
}


def modelspec_architecture(family: str, prediction_type: str) -> str:
    return get_family(family).modelspec_architecture(prediction_type)


@dataclass
class TrainingInfo:
    """What the exporter knows about the run; anything unknown stays out of the file."""

    family: str
    prediction_type: str
    rank: int
    alpha: float
    output_name: str
    base_model: str = ""
    resolution: tuple[int, int] = (512, 512)
    steps: int = 0
    epoch: int = 0
    num_train_images: int | None = None
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    seed: int | None = None
    mixed_precision: str = ""
    clip_skip: int | None = None
    max_token_length: int | None = None
    trains_text_encoder: bool = False
    tag_frequency: dict | None = None
    started_at: float = 0.0
    network_args: dict = field(default_factory=dict)
    network_module: str = "networks.lora"  # kohya's for LoRA/LoCon; LyCORIS files say lycoris.kohya
    max_sequence_length: int | None = None  # flow families only, from here down
    guidance: float | None = None
    timestep_sampling: str | None = None
    flow_shift: str | None = None


def kohya_metadata(info: TrainingInfo) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` keys for a kohya-format file."""
    width, height = info.resolution
    meta = {
        "ss_network_module": info.network_module,
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": _number(info.alpha),
        "ss_network_args": json.dumps(info.network_args) if info.network_args else "",
        "ss_base_model_version": get_family(info.family).base_model_version,
        "ss_v2": str(info.family == "sd2"),
        "ss_v_parameterization": str(info.prediction_type == "v_prediction"),
        "ss_sd_model_name": info.base_model,
        "ss_resolution": f"({width}, {height})",
        "ss_steps": str(info.steps),
        "ss_epoch": str(info.epoch),
        "ss_output_name": info.output_name,
        "ss_training_started_at": str(info.started_at),
        "ss_network_train_unet_only": str(not info.trains_text_encoder),
        "ss_mixed_precision": info.mixed_precision,
        "ss_training_comment": f"trained with lorafit {__version__}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(info.family, info.prediction_type),
        # kohya writes SGM for SDXL LoRAs (SGM key names), BFL's repository for Flux (BFL key names)
        # and "diffusers" for SD1/2 ones.
        "modelspec.implementation": _IMPLEMENTATION.get(info.family, "diffusers"),
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": {"v_prediction": "v", "epsilon": "epsilon"}.get(info.prediction_type, ""),
        "modelspec.date": datetime.datetime.fromtimestamp(int(info.started_at or 0)).isoformat()
        if info.started_at
        else "",
    }
    optional = {
        "ss_num_train_images": info.num_train_images,
        "ss_learning_rate": info.learning_rate,
        "ss_unet_lr": info.learning_rate,
        "ss_text_encoder_lr": info.text_encoder_lr if info.trains_text_encoder else None,
        "ss_seed": info.seed,
        "ss_clip_skip": info.clip_skip if info.family in ("sd1", "sd2") else None,
        "modelspec.encoder_layer": info.clip_skip if info.family in ("sd1", "sd2") else None,
        "ss_max_token_length": info.max_token_length,
        # Flux (kohya's names): the T5 length and the training guidance of guidance-distilled models.
        "ss_t5xxl_max_token_length": info.max_sequence_length,
        "ss_guidance_scale": info.guidance,
        "ss_timestep_sampling": info.timestep_sampling,
        "ss_discrete_flow_shift": info.flow_shift,
    }
    meta.update({k: _number(v) for k, v in optional.items() if v is not None})
    if info.tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(info.tag_frequency)
    return {k: v for k, v in meta.items() if v != ""}


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 else repr(value)
    return str(value)
