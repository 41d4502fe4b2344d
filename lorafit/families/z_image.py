"""Z-Image (Turbo and Base): a 6 B single-stream DiT (``ZImageTransformer2DModel``) conditioned by Qwen3-4B.

What differs from FLUX.1, checked against diffusers' ``ZImagePipeline`` (0.42):

- Conditioning: Qwen3's second-to-last hidden state over the chat template (``enable_thinking=True``:
  no think block), padded to 512 tokens for the encoder, then only the caption's real tokens are kept:
  the transformer takes a list of different lengths (:mod:`llm_text` pads them for a batch and keeps a mask).
- Latents: FLUX.1's 16-channel VAE (``scaling_factor`` and ``shift_factor``), patchified 2x2 inside
  the transformer, which takes a list of [C, 1, h, w] latents.
- Timestep convention: the transformer takes ``1 - sigma`` (the pipeline passes ``(1000 - t) / 1000``)
  and predicts ``x0 - noise``, the negated velocity, which the pipeline flips before its Euler step;
  :meth:`ZImageFamily.predict` does both, so the flow objective is the same as for every flow family.
- Sampling: Turbo is distilled to ~8 steps without CFG (``--l 0``); Base uses CFG 4 (the pipeline's
  ``guidance_scale`` counts from 0: ``pos + g * (pos - neg)``). The scheduler's shift is fixed (3.0).
- Names: kohya/ComfyUI files use ComfyUI's native layout with q/k/v fused (:mod:`z_image_layout`);
  musubi-tuner's ``lora_unet_`` + diffusers-path files and ai-toolkit's ``diffusion_model.`` files are read.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.block_presets import block_preset_modules
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.families.llm_text import check_cached_length, pad_embeddings, text_only_pipeline
from lorafit.families.z_image_layout import comfy_modules

_ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
_MODULATION = ("adaLN_modulation.0",)
# A Z-Image transformer file, native (ComfyUI) or diffusers names; Lumina2 has adaLN_modulation.1 instead.
_MARKERS = ("layers.0.adaLN_modulation.0.weight", "cap_embedder.1.weight")


class ZImageFamily(Family):
    name: ClassVar[str] = "z-image"
    title: ClassVar[str] = "Z-Image"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3-4B
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ()
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_embeds_mask")
    kohya_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet"}
    clip_components: ClassVar[tuple[str, ...]] = ()
    # musubi-tuner's own files (lora_unet_ + diffusers path), SimpleTuner's LyCORIS names.
    kohya_aliases: ClassVar[tuple[str, ...]] = ("lora_unet", "lycoris", "lora_transformer")
    load_formats: ClassVar[tuple[str, ...]] = ("hub id", "diffusers directory", "single file + parts")
    kohya_names: ClassVar[str] = "ComfyUI's native names, q/k/v fused"
    pipeline_class: ClassVar[str] = "ZImagePipeline"
    base_model_version: ClassVar[str] = "z_image"  # musubi-tuner's architecture name

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "ZImageTransformer2DModel"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        plain = {key.removeprefix("model.diffusion_model.") for key in keys}
        return all(marker in plain for marker in _MARKERS)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "Z-Image/lora"  # musubi-tuner's sai_model_spec

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.transformer_files import load_transformer_single_file

        # The VAE is FLUX.1's (ae.safetensors), which diffusers reads as a single file.
        return load_transformer_single_file(self, path, config, parts, quantization, dtype, vae_file=True)

    # ---- conditioning -------------------------------------------------------------------------

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        return options.max_sequence_length or 512  # ZImagePipeline's default, chat template included

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        from diffusers import ZImagePipeline

        with torch.no_grad():  # Qwen3 is never trained
            # A copy: ZImagePipeline writes the chat-templated text back into the list it is given.
            embeds, _ = text_only_pipeline(ZImagePipeline, base).encode_prompt(
                list(captions),
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.sequence_length(base, options),
            )
        prompt_embeds, mask = pad_embeddings(embeds)
        return {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": mask}

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        check_cached_length(self.title, cached, self.sequence_length(base, options))

    # ---- the transformer ------------------------------------------------------------------------

    def latent_size_multiple(self) -> int:
        return 2

    def predict(self, base, noisy, timesteps, conditioning, batch, options) -> torch.Tensor:
        dtype = base.denoiser_dtype()
        h, w = noisy.shape[-2:]
        if h % 2 or w % 2:
            raise LorafitError(f"Z-Image patchifies 2x2 latents; latents of {h}x{w} are odd (bucket steps of 16 px)")
        embeds, mask = conditioning["prompt_embeds"].to(dtype), conditioning.get("prompt_embeds_mask")
        captions = list(embeds) if mask is None else [e[m.to(e.device).bool()] for e, m in zip(embeds, mask)]
        out = base.denoiser(
            list(noisy.to(dtype).unsqueeze(2).unbind(0)),  # one [C, frames=1, h, w] latent per image
            1 - timesteps.to(dtype),  # Z-Image's own time runs from noise (0) to data (1)
            captions,  # each caption's real tokens only
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)  # it predicts x0 - noise; the objective regresses noise - x0

    # ---- networks -------------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: the attention projections of the main ``layers``; ``attn-mlp``: also their
        feed-forward (musubi-tuner's default, which leaves the refiners and modulation out); ``full``:
        every Linear, refiners, embedders and the final layer included."""
        return block_preset_modules(denoiser, preset, {"layers": (_ATTENTION, _MODULATION)})

    def kohya_layout(self, denoiser_config: Any):
        return comfy_modules(denoiser_config, self.kohya_prefixes["transformer"])

    # ---- inference and tests ----------------------------------------------------------------

    def native_size(self, base: BaseModel) -> int:
        return 1024

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--l`` is the pipeline's ``guidance_scale``, which counts from 0 (Turbo: 0, no CFG; Base: 4)."""
        arguments = dict(prompt=prompt, guidance_scale=cfg)
        if cfg > 0 and negative_prompt:
            arguments["negative_prompt"] = negative_prompt
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        encoded = dict(arguments)
        cfg = encoded["guidance_scale"] > 0
        encoded["prompt_embeds"], encoded["negative_prompt_embeds"] = pipe.encode_prompt(
            [encoded.pop("prompt")],
            device=device,
            do_classifier_free_guidance=cfg,
            negative_prompt=encoded.pop("negative_prompt", None),
        )
        if not cfg:
            encoded.pop("negative_prompt_embeds")
        return encoded

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.z_image_tiny import tiny_z_image_pipeline

        return tiny_z_image_pipeline(seed=seed)
