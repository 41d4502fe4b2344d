"""Stable Diffusion XL: CLIP-L + OpenCLIP bigG text encoders, a UNet with ``text_time`` micro-conditioning.

kohya/A1111/ComfyUI name SDXL UNet modules by the original SGM layout
(``lora_unet_input_blocks_4_1_...``), not by diffusers' paths: :mod:`lorafit.families.original_layout`
maps between the two. The first text encoder is ``lora_te1`` (CLIP-L), the second ``lora_te2``
(bigG); swapped, a file loads broken.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lorafit.families.clip_text import sdxl_time_ids
from lorafit.families.family import BaseModel
from lorafit.families.unet import UNetFamily

# Only the SGM (SDXL) checkpoint layout has a second text-encoder embedder.
SDXL_SINGLE_FILE_PREFIX = "conditioner.embedders.1."


class SDXLFamily(UNetFamily):
    name: ClassVar[str] = "sdxl"
    title: ClassVar[str] = "Stable Diffusion XL"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    base_model_version: ClassVar[str] = "sdxl_base_v1-0"
    kohya_names: ClassVar[str] = "SGM block names"

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("unet") or [None, None])[1] == "UNet2DConditionModel" and (
            "text_encoder_2" in index or denoiser_config.get("addition_embed_type") == "text_time"
        )

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        return any(k.startswith(SDXL_SINGLE_FILE_PREFIX) for k in keys)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def added_conditioning(self, base: BaseModel, noisy: torch.Tensor, conditioning: dict, batch: dict):
        # Pixel size of the training image = latent size times the VAE's downscale factor.
        scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
        target_size = (noisy.shape[-2] * scale, noisy.shape[-1] * scale)
        device = noisy.device
        time_ids = sdxl_time_ids(batch["original_size"].to(device), batch["crop_top_left"].to(device), target_size)
        return {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": time_ids}

    def kohya_stem(self, component: str, module: str, config: Any = None) -> str:
        if component == "unet":
            from lorafit.families.original_layout import unet_module_to_original

            return "lora_unet_" + unet_module_to_original(module, config).replace(".", "_")
        return super().kohya_stem(component, module, config)

    def build_pipeline(self, base: BaseModel, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            text_encoder_2=base.text_encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=base.denoiser,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=seed)
