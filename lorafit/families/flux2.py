"""FLUX.2 [klein] (4 B / 9 B, base and distilled): ``Flux2Transformer2DModel`` conditioned by Qwen3.

What differs from FLUX.1, checked against diffusers' ``Flux2KleinPipeline`` (0.42):

- Conditioning: Qwen3 (4 B or 8 B) over the chat template with thinking off; the hidden states of layers
  9, 18 and 27 are stacked on the feature axis, for 512 tokens padded, no mask (the transformer
  attends to the padding, as the pipeline does). No pooled vector, no guidance embedding.
- Latents: the 32-channel ``AutoencoderKLFlux2``; the pipeline patchifies them 2x2 into 128 channels and
  normalises those with the VAE's BatchNorm running statistics. Training keeps the 32-channel layout
  (:meth:`Flux2KleinFamily.normalize_latents` normalises in the patchified space and folds back), which
  holds the same numbers in another order, so the objective and its noise are the pipeline's.
- Objective: flow matching on sigmas (the pipeline passes ``t / 1000``). Inference shifts by an empirical
  ``mu`` of token count and step count; training uses musubi-tuner's ``flux2_shift`` (FLUX.1's linear
  ``mu`` between 256 and 4096 tokens).
- Sampling: base models use CFG (``--l``, the pipeline's ``guidance_scale``, default 4 on the model
  cards) against the empty prompt; distilled [klein] models (``is_distilled``) run 4 steps without it.
- Names: kohya/ComfyUI files use BFL's names (:mod:`flux2_layout`), as musubi-tuner's ``lora_flux_2``;
  FLUX.2 [dev] (Mistral text encoder, ``Flux2Pipeline``) is not this family.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.block_presets import block_preset_modules
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.families.flux2_layout import bfl_modules
from lorafit.families.llm_text import check_cached_length, text_only_pipeline

_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_DOUBLE_ATTENTION += ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_SINGLE_ATTENTION = ("attn.to_qkv_mlp_proj", "attn.to_out")  # fused with the MLP's in diffusers as in BFL's
_FLUX2_KEY = "single_stream_modulation.lin.weight"  # BFL's FLUX.2 files (diffusers' own detection key)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 4C, h/2, w/2], as Flux2KleinPipeline patchifies VAE latents."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._patchify_latents(latents)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._unpatchify_latents(latents)


class Flux2KleinFamily(Family):
    name: ClassVar[str] = "flux2-klein"
    title: ClassVar[str] = "FLUX.2 [klein]"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3-4B / Qwen3-8B
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ()
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    kohya_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet"}  # musubi-tuner's lora_flux_2
    clip_components: ClassVar[tuple[str, ...]] = ()
    kohya_aliases: ClassVar[tuple[str, ...]] = ("lora_transformer", "lycoris")  # OneTrainer, SimpleTuner
    load_formats: ClassVar[tuple[str, ...]] = ("hub id", "diffusers directory", "single file + parts")
    kohya_names: ClassVar[str] = "BFL names, q/k/v fused"
    pipeline_class: ClassVar[str] = "Flux2KleinPipeline"
    base_model_version: ClassVar[str] = "flux_2_klein"

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        transformer = (index.get("transformer") or [None, None])[1] == "Flux2Transformer2DModel"
        return transformer and index.get("_class_name", cls.pipeline_class) == cls.pipeline_class

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        plain = {key.removeprefix("model.diffusion_model.") for key in keys}
        # FLUX.2 [dev] has a guidance embedding and a Mistral-sized text input: not [klein].
        return _FLUX2_KEY in plain and not any(key.startswith("guidance_in.") for key in plain)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "Flux.2-klein/lora"  # musubi-tuner writes Flux.2-klein-4b / -9b

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.transformer_files import load_transformer_single_file

        return load_transformer_single_file(self, path, config, parts, quantization, dtype, vae_file=False)

    # ---- conditioning -------------------------------------------------------------------------

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        return options.max_sequence_length or 512  # Flux2KleinPipeline's default

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        from diffusers import Flux2KleinPipeline

        with torch.no_grad():  # Qwen3 is never trained
            embeds, _ = text_only_pipeline(Flux2KleinPipeline, base).encode_prompt(
                list(captions), device=device, max_sequence_length=self.sequence_length(base, options)
            )
        return {"prompt_embeds": embeds}

    def check_cached_conditioning(self, base: BaseModel, batch: dict, options: TextOptions) -> None:
        length, found = self.sequence_length(base, options), batch["prompt_embeds"].shape[1]
        if found != length:
            raise LorafitError(
                f"the data's cached Qwen3 embeddings have {found} tokens, but model.conditioning.max_sequence_length "
                f"needs {length}; run `lorafit cache ... --text_embeddings true --max_sequence_length {length}` "
                f"again, or set it to {found}"
            )

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        check_cached_length(self.title, cached, self.sequence_length(base, options))

    # ---- latents and the transformer ------------------------------------------------------------

    def normalize_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        # The pipeline's (patchify(z) - bn.running_mean) / sqrt(bn.running_var + eps), folded back to 32 channels.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device)
        return unpatchify((patchify(latents) - mean) / std.to(latents.dtype))

    def latent_size_multiple(self) -> int:
        return 2

    def resolution_shift(self, latent_height: int, latent_width: int, scheduler_config: dict) -> float | None:
        # musubi-tuner's flux2_shift: FLUX.1's mu line (256 tokens -> 0.5, 4096 -> 1.15) on the patch count.
        tokens = (latent_height // 2) * (latent_width // 2)
        return math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))

    def predict(self, base, noisy, timesteps, conditioning, batch, options) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        dtype = base.denoiser_dtype()
        h, w = noisy.shape[-2:]
        if h % 2 or w % 2:
            raise LorafitError(f"FLUX.2 patchifies 2x2 latents; latents of {h}x{w} are odd (bucket steps of 16 px)")
        patches = patchify(noisy)
        embeds = conditioning["prompt_embeds"].to(dtype)
        out = base.denoiser(
            hidden_states=Flux2KleinPipeline._pack_latents(patches).to(dtype),
            encoder_hidden_states=embeds,
            timestep=timesteps.to(dtype),  # sigmas: the pipeline passes t / 1000
            img_ids=Flux2KleinPipeline._prepare_latent_ids(patches).to(noisy.device),
            txt_ids=Flux2KleinPipeline._prepare_text_ids(embeds).to(noisy.device),
            guidance=None,  # as Flux2KleinPipeline calls it
            return_dict=False,
        )[0]
        return unpatchify(out.transpose(1, 2).reshape(patches.shape))

    # ---- networks -------------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: the double blocks' attention projections and the single blocks' fused attention
        Linears (which carry the MLP too, as in BFL's model); ``attn-mlp``: every Linear of the double
        and single blocks (musubi-tuner's default; the shared modulation sits outside them); ``full``:
        every Linear, modulation, embedders and final layer included."""
        blocks = {"transformer_blocks": (_DOUBLE_ATTENTION, ()), "single_transformer_blocks": (_SINGLE_ATTENTION, ())}
        return block_preset_modules(denoiser, preset, blocks)

    def kohya_layout(self, denoiser_config: Any):
        return bfl_modules(denoiser_config, self.kohya_prefixes["transformer"])

    # ---- inference and tests ------------------------------------------------------------------

    def build_pipeline(self, base: BaseModel, scheduler):
        from diffusers import Flux2KleinPipeline

        distilled = bool(base.pipeline_config.get("is_distilled", False))
        return Flux2KleinPipeline(
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            transformer=base.denoiser,
            is_distilled=distilled,
        )

    def native_size(self, base: BaseModel) -> int:
        return 1024

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--l`` is CFG against the empty prompt (the pipeline takes no negative prompt, so ``--n`` is
        not read); distilled models ignore it."""
        return dict(prompt=prompt, guidance_scale=cfg)

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        encoded = dict(arguments)
        encoded["prompt_embeds"], _ = pipe.encode_prompt(encoded.pop("prompt"), device=device)
        if encoded["guidance_scale"] > 1 and not pipe.config.is_distilled:  # the pipeline's CFG condition
            encoded["negative_prompt_embeds"], _ = pipe.encode_prompt("", device=device)
        return encoded

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.flux2_tiny import tiny_flux2_klein_pipeline

        return tiny_flux2_klein_pipeline(seed=seed)
