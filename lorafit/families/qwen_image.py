"""Qwen-Image: a 20 B MMDiT (``QwenImageTransformer2DModel``) conditioned by Qwen2.5-VL-7B, on a video VAE.

What differs from FLUX.1, checked against diffusers' ``QwenImagePipeline`` (0.42):

- Conditioning: the last hidden state of Qwen2.5-VL over a fixed chat template whose first 34 tokens
  (the system prompt) are dropped; captions keep their own length, with a mask (:mod:`llm_text`).
  No pooled vector, no guidance embedding: sampling uses true CFG (``true_cfg_scale``) with a negative
  prompt, " " when none is given (the Qwen-Image model card's call).
- Latents: ``AutoencoderKLQwenImage`` is a causal video VAE (one frame here); its 16 channels are
  normalised per channel by ``latents_mean``/``latents_std`` and packed 2x2 into tokens as FLUX.1's.
- Objective: rectified flow, the transformer taking the sigma (``t / 1000``); the resolution-dependent
  shift comes from the scheduler config (256 -> 0.5, 8192 -> 0.9 tokens; musubi-tuner's ``qwen_shift``).
- Names: ComfyUI runs the model under diffusers' module names, so kohya/ComfyUI files are
  ``lora_unet_`` + the diffusers path, as kohya's musubi-tuner writes them (no fused modules).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.block_presets import block_preset_modules
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.families.flux import pack_latents, unpack_latents
from lorafit.families.llm_text import check_cached_length, text_only_pipeline, token_mask

_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_ATTENTION += ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_MODULATION = ("img_mod.1", "txt_mod.1")
# A Qwen-Image transformer file (ComfyUI's diffusion_models/qwen_image_*.safetensors) under diffusers' names.
_MARKERS = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")
_QWEN_IMAGE_21 = "txt_in.text_norm.weight"  # Qwen-Image 2.1: another transformer class


class QwenImageFamily(Family):
    name: ClassVar[str] = "qwen-image"
    title: ClassVar[str] = "Qwen-Image"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen2.5-VL-7B
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ()
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_embeds_mask")
    kohya_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet"}  # musubi-tuner's lora_qwen_image
    clip_components: ClassVar[tuple[str, ...]] = ()
    load_formats: ClassVar[tuple[str, ...]] = ("hub id", "diffusers directory", "single file + parts")
    pipeline_class: ClassVar[str] = "QwenImagePipeline"
    base_model_version: ClassVar[str] = "qwen_image"  # musubi-tuner's architecture name

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "QwenImageTransformer2DModel"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        plain = {key.removeprefix("model.diffusion_model.") for key in keys}
        return all(marker in plain for marker in _MARKERS) and _QWEN_IMAGE_21 not in plain

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "Qwen-Image/lora"  # musubi-tuner's sai_model_spec

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.transformer_files import load_transformer_single_file

        return load_transformer_single_file(self, path, config, parts, quantization, dtype, vae_file=False)

    # ---- conditioning ---------------------------------------------------------------------------

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        return options.max_sequence_length or 1024  # QwenImagePipeline's tokenizer_max_length and its maximum

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        from diffusers import QwenImagePipeline

        length = self.sequence_length(base, options)
        if length > 1024:
            raise LorafitError(f"model.conditioning.max_sequence_length: {length}; Qwen-Image reads at most 1024")
        with torch.no_grad():  # Qwen2.5-VL is never trained
            embeds, mask = text_only_pipeline(QwenImagePipeline, base).encode_prompt(
                list(captions), device=device, max_sequence_length=length
            )
        mask = token_mask(embeds, mask)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        check_cached_length(self.title, cached, self.sequence_length(base, options))

    # ---- latents and the transformer ------------------------------------------------------------

    def vae_posterior(self, vae: torch.nn.Module, pixels: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = vae.encode(pixels.unsqueeze(2)).latent_dist.parameters  # [B, 2C, frames=1, h, w]
        return DiagonalGaussianDistribution(moments.squeeze(2))

    def latent_channels(self, vae: torch.nn.Module) -> int:
        return int(vae.config.z_dim)

    def vae_scale_factor(self, vae: torch.nn.Module) -> int:
        return 2 ** len(vae.config.temperal_downsample)

    def normalize_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        # QwenImagePipeline decodes latents * std + mean; training sees the inverse.
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) / std

    def latent_size_multiple(self) -> int:
        return 2

    def resolution_shift(self, latent_height: int, latent_width: int, scheduler_config: dict) -> float | None:
        # QwenImagePipeline's calculate_shift on the packed token count, with its scheduler's constants.
        tokens = (latent_height // 2) * (latent_width // 2)
        get = scheduler_config.get
        base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 8192)
        base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 0.9)
        return math.exp(base_shift + (max_shift - base_shift) * (tokens - base_len) / (max_len - base_len))

    def predict(self, base, noisy, timesteps, conditioning, batch, options) -> torch.Tensor:
        dtype = base.denoiser_dtype()
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise LorafitError(f"Qwen-Image packs 2x2 latent patches; latents of {h}x{w} are odd (use 16 px steps)")
        mask = conditioning.get("prompt_embeds_mask")  # absent: every token is a caption's
        if mask is not None and bool(mask.all()):  # as the pipeline passes it: None when nothing is padded
            mask = None
        out = base.denoiser(
            hidden_states=pack_latents(noisy).to(dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=None if mask is None else mask.to(noisy.device),
            timestep=timesteps.to(dtype),  # sigmas: the pipeline passes t / 1000
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ---- networks ----------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: image and text attention projections of every block (the diffusers example trains
        ``to_q/k/v/out``); ``attn-mlp``: every block Linear but ``img_mod``/``txt_mod`` (musubi-tuner's
        default); ``full``: every Linear."""
        return block_preset_modules(denoiser, preset, {"transformer_blocks": (_ATTENTION, _MODULATION)})

    # ---- inference and tests ---------------------------------------------------------------

    def native_size(self, base: BaseModel) -> int:
        return 1328  # the Qwen-Image model card's 1:1 size

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--l`` is true CFG (the model card uses 4); it runs when above 1, against ``--n`` or " "."""
        arguments = dict(prompt=prompt, true_cfg_scale=cfg)
        if cfg > 1:  # the pipeline runs CFG only with a negative prompt (and warns about one without CFG)
            arguments["negative_prompt"] = negative_prompt or " "
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        encoded = dict(arguments)
        for text, key in (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds")):
            if text in encoded:
                # A full mask where encode_prompt gives None: the pipeline warns about embeddings without one.
                embeds, mask = pipe.encode_prompt(encoded.pop(text), device)
                encoded.update({key: embeds, f"{key}_mask": token_mask(embeds, mask).long()})
        return encoded

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.qwen_image_tiny import tiny_qwen_image_pipeline

        return tiny_qwen_image_pipeline(seed=seed)
