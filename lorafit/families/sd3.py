"""Stable Diffusion 3.5 (Large, Large Turbo, Medium) and SD3 Medium: the MMDiT ``SD3Transformer2DModel``.

What differs from FLUX.1, checked against diffusers' ``StableDiffusion3Pipeline`` (0.42):

- Conditioning: three text encoders. CLIP-L and CLIP-G give their penultimate hidden states (77 tokens,
  concatenated on the feature axis and zero-padded to T5's width) and their projected pooled vectors
  (concatenated: ``pooled_prompt_embeds``); T5-XXL's sequence (256 tokens by default, kohya's and the
  pipeline's) follows the CLIP tokens. The CLIP encoders can train (kohya's ``lora_te1``/``lora_te2``),
  T5 never does here.
- Latents: a 16-channel VAE with ``scaling_factor`` and ``shift_factor``; the transformer patchifies
  them itself (2x2), so it takes [B, 16, h, w] latents. SD3.5 Medium's first blocks (MMDiT-X) add a
  second image attention.
- Objective: flow matching; the transformer takes ``sigma * 1000`` (the pipeline passes the scheduler's
  ``t``). The scheduler's shift is a fixed 3.0 (no resolution-dependent shift), which the config trains with.
- Sampling: CFG (``--l``, the pipeline's ``guidance_scale``; the model cards use 3.5-4.5) against ``--n``.
- Names: kohya/ComfyUI files use the MMDiT's names with q/k/v fused (:mod:`sd3_layout`), as kohya's
  ``lora_sd3``; diffusers' ``load_lora_weights`` reads only the diffusers file (it has no kohya reader
  for SD3).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.block_presets import block_preset_modules
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.families.sd3_layout import original_modules

_ATTENTION = tuple(f"attn.to_{n}" for n in "qkv") + ("attn.to_out.0",)
_ATTENTION += tuple(f"attn.add_{n}_proj" for n in "qkv") + ("attn.to_add_out",)
_ATTENTION += tuple(f"attn2.to_{n}" for n in "qkv") + ("attn2.to_out.0",)  # SD3.5 Medium's MMDiT-X blocks
_MODULATION = ("norm1.linear", "norm1_context.linear")
_MMDIT_KEY = "joint_blocks.0.x_block.attn.qkv.weight"  # SAI's files (diffusers' own detection key)


class SD3Family(Family):
    name: ClassVar[str] = "sd3"
    title: ClassVar[str] = "Stable Diffusion 3.5"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    # kohya's lora_sd3.py: lora_unet for the MMDiT ("ComfyUI compatible"), lora_te1/2/3 for CLIP-L/G and T5.
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",  # kohya can train T5; lorafit reads such files, never trains it
    }
    clip_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    kohya_aliases: ClassVar[tuple[str, ...]] = ("lora_transformer", "lycoris")  # OneTrainer, SimpleTuner
    load_formats: ClassVar[tuple[str, ...]] = ("hub id", "diffusers directory", "single file + parts")
    kohya_names: ClassVar[str] = "MMDiT names, q/k/v fused"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    base_model_version: ClassVar[str] = "sd3"  # kohya's sd3_train_network

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "SD3Transformer2DModel"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        return _MMDIT_KEY in keys or f"model.diffusion_model.{_MMDIT_KEY}" in keys

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v3-medium/lora"  # the modelspec name kohya writes for SD3 (Medium and 3.5)

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.transformer_files import load_transformer_single_file

        return load_transformer_single_file(self, path, config, parts, quantization, dtype, vae_file=True)

    # ---- conditioning -------------------------------------------------------------------------

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        return options.max_sequence_length or 256  # StableDiffusion3Pipeline's and kohya's T5 length

    def _text_pipeline(self, base: BaseModel):
        from diffusers import StableDiffusion3Pipeline

        encoders = dict(zip(self.text_encoder_components, base.text_encoders))
        tokenizers = dict(zip(self.tokenizer_components, base.tokenizers))
        return StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **encoders, **tokenizers)

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt: CLIP runs with gradients when its LoRA trains; T5 has no
        # trainable weights, so no graph is kept for it.
        embeds, _, pooled, _ = self._text_pipeline(base).encode_prompt(
            list(captions),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.sequence_length(base, options),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def check_cached_conditioning(self, base: BaseModel, batch: dict, options: TextOptions) -> None:
        clip = base.tokenizers[0].model_max_length
        length, found = self.sequence_length(base, options), batch["prompt_embeds"].shape[1] - clip
        if found != length:
            raise LorafitError(
                f"the data's cached T5 embeddings have {found} tokens, but model.conditioning.max_sequence_length "
                f"needs {length}; run `lorafit cache ... --text_embeddings true --max_sequence_length {length}` "
                f"again, or set it to {found}"
            )

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        from lorafit.families.llm_text import check_cached_length

        check_cached_length(self.title, cached, self.sequence_length(base, options))

    # ---- the transformer ------------------------------------------------------------------------

    def latent_size_multiple(self) -> int:
        return 2

    def predict(self, base, noisy, timesteps, conditioning, batch, options) -> torch.Tensor:
        dtype = base.denoiser_dtype()
        h, w = noisy.shape[-2:]
        if h % 2 or w % 2:
            raise LorafitError(f"SD3 patchifies 2x2 latents; latents of {h}x{w} are odd (bucket steps of 16 px)")
        return base.denoiser(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(dtype),
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            timestep=(timesteps * 1000).to(dtype),  # the pipeline passes the scheduler's t = sigma * 1000
            return_dict=False,
        )[0]

    # ---- networks -------------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: the image and text attention projections of every joint block (the diffusers example's
        ``to_q/k/v/out``, with the text stream's); ``attn-mlp``: every block Linear but the modulation;
        ``full``: every Linear, modulation (kohya's lora_sd3 trains it), embedders and final layer included."""
        return block_preset_modules(denoiser, preset, {"transformer_blocks": (_ATTENTION, _MODULATION)})

    def kohya_layout(self, denoiser_config: Any):
        return original_modules(denoiser_config, self.kohya_prefixes["transformer"])

    # ---- inference and tests ------------------------------------------------------------------

    def build_pipeline(self, base: BaseModel, scheduler):
        from diffusers import StableDiffusion3Pipeline

        encoders = dict(zip(self.text_encoder_components, base.text_encoders))
        tokenizers = dict(zip(self.tokenizer_components, base.tokenizers))
        return StableDiffusion3Pipeline(
            transformer=base.denoiser, scheduler=scheduler, vae=base.vae, **encoders, **tokenizers
        )

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--l`` is the pipeline's CFG (``guidance_scale``, above 1 to run) against ``--n`` or ""."""
        arguments = dict(prompt=prompt, guidance_scale=cfg)
        if cfg > 1 and negative_prompt:
            arguments["negative_prompt"] = negative_prompt
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        encoded = dict(arguments)
        cfg = encoded["guidance_scale"] > 1
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            encoded.pop("prompt"),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=cfg,
            **({"max_sequence_length": encoded["max_sequence_length"]} if "max_sequence_length" in encoded else {}),
            negative_prompt=encoded.pop("negative_prompt", None),
        )
        encoded.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if cfg:
            encoded.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return encoded

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.sd3_tiny import tiny_sd3_pipeline

        return tiny_sd3_pipeline(seed=seed)
