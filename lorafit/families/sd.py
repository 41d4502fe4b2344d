"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, epsilon (SD1) or v-prediction (SD2-768).

SD2 differs from SD1 by OpenCLIP's 1024-wide context and linear ``proj_in``/``proj_out``; the
prediction type is read from the scheduler config (SD2-base is epsilon, SD2-768 v-prediction).
"""

from __future__ import annotations

from typing import ClassVar

from lorafit.families.family import BaseModel
from lorafit.families.unet import UNetFamily

# Single-file checkpoints: the text encoder's place names the family (LDM layout).
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."


def is_sd2_unet(unet_config) -> bool:
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    return bool(get("use_linear_projection")) or get("cross_attention_dim") == 1024


class _SDFamily(UNetFamily):
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    kohya_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    _sd2: ClassVar[bool] = False

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        if (index.get("unet") or [None, None])[1] != "UNet2DConditionModel" or "text_encoder_2" in index:
            return False
        if denoiser_config.get("addition_embed_type") == "text_time":
            return False
        return is_sd2_unet(denoiser_config) == cls._sd2

    def pipeline_kwargs(self) -> dict:
        return dict(safety_checker=None, requires_safety_checker=False)

    def build_pipeline(self, base: BaseModel, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            unet=base.denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(sd2=self._sd2, seed=seed)


class SD1Family(_SDFamily):
    name: ClassVar[str] = "sd1"
    title: ClassVar[str] = "Stable Diffusion 1.x"
    base_model_version: ClassVar[str] = "sd_v1"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        return any(k.startswith(SD1_TEXT_PREFIX) for k in keys)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1/lora"


class SD2Family(_SDFamily):
    name: ClassVar[str] = "sd2"
    title: ClassVar[str] = "Stable Diffusion 2.x"
    base_model_version: ClassVar[str] = "sd_v2"
    _sd2: ClassVar[bool] = True

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        return any(k.startswith(SD2_TEXT_PREFIX) for k in keys)

    def modelspec_architecture(self, prediction_type: str) -> str:
        if prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v/lora"
        return "stable-diffusion-v2-512/lora"
