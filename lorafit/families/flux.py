"""FLUX.1 ([dev], [schnell] and fine-tunes of them): a rectified-flow transformer on packed latents.

What this family does differently from the UNet ones (checked against diffusers' ``FluxPipeline``,
whose conditioning training must reproduce):

- Conditioning: CLIP-L gives only its pooled vector (``pooled_prompt_embeds``); T5-XXL gives the
  token sequence (``prompt_embeds``, 512 tokens for [dev], 256 for [schnell]). T5 never trains.
- Latents: the 16-channel VAE has a ``shift_factor`` besides its ``scaling_factor``; the transformer
  sees them packed 2x2 into tokens (``in_channels`` = 4 x 16) with 3-axis position ids.
- Objective: flow matching. The transformer takes the sigma in (0, 1] as its timestep (the
  pipeline passes ``t / 1000``); [dev] is guidance-distilled and takes a guidance value too.
- kohya/ComfyUI files use BFL's fused module names (:mod:`lorafit.families.flux_layout`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import BaseModel, Family, TextOptions, adaptable_modules
from lorafit.families.flux_layout import bfl_modules

# A BFL single file (flux1-dev.safetensors, ComfyUI's diffusion_models/) names blocks like this;
# checkpoints that bundle the VAE and text encoders put it under model.diffusion_model.
_BFL_KEY = "double_blocks.0.img_attn.qkv.weight"
# Flux-derived architectures with the same blocks that are other families (not Flux.1).
_OTHER_BFL_MARKERS = ("distilled_guidance_layer.", "double_stream_modulation_img.")

_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_DOUBLE_ATTENTION += ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
_SINGLE_MLP = ("proj_mlp", "proj_out")
PRESETS = ("attn", "attn-mlp", "full")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: each 2x2 patch of latents one token (FluxPipeline's packing)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids [h/2 * w/2, 3] of the packed tokens: (0, row, column), as FluxPipeline makes them."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily(Family):
    name: ClassVar[str] = "flux"
    title: ClassVar[str] = "FLUX.1"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "pooled_prompt_embeds")
    # kohya's lora_flux.py: lora_unet for the transformer ("ComfyUI compatible"), lora_te1 for CLIP-L.
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",  # CLIP-L
        "text_encoder_2": "lora_te2",  # T5-XXL: kohya can train it; lorafit reads such files, never trains it
    }
    clip_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    kohya_aliases: ClassVar[tuple[str, ...]] = ("lora_transformer", "lycoris")  # OneTrainer, SimpleTuner
    pipeline_class: ClassVar[str] = "FluxPipeline"
    base_model_version: ClassVar[str] = "flux1"
    kohya_names: ClassVar[str] = "BFL names, q/k/v fused"
    load_formats: ClassVar[tuple[str, ...]] = ("diffusers directory", "hub id", "single file + parts")

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        bfl = _BFL_KEY in keys or f"model.diffusion_model.{_BFL_KEY}" in keys
        return bfl and not any(marker in key for key in keys for marker in _OTHER_BFL_MARKERS)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "flux-1-dev/lora"  # schnell is told apart in metadata by ss_base_model_version only

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.flux_files import load_flux_single_file

        return load_flux_single_file(path, config, parts, quantization, dtype)

    # ---- conditioning ---------------------------------------------------------------------------

    @staticmethod
    def guidance_distilled(base: BaseModel) -> bool:
        return bool(base.denoiser.config.guidance_embeds)

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        default = 512 if self.guidance_distilled(base) else 256
        # A T5 tokenizer declaring a shorter context (the toy Flux base's 16 tokens) caps the
        # default; FLUX.1's own declares 512, so the released models keep 512 / 256.
        declared = getattr(base.tokenizers[1], "model_max_length", default) if len(base.tokenizers) > 1 else default
        return options.max_sequence_length or min(default, declared)

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        clip, t5 = base.text_encoders
        clip_tokenizer, t5_tokenizer = base.tokenizers
        clip_ids = clip_tokenizer(
            list(captions),
            padding="max_length",
            max_length=clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        t5_ids = t5_tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.sequence_length(base, options),
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        with torch.no_grad():  # T5 is always frozen
            sequence = t5(t5_ids, output_hidden_states=False)[0]
        return {"prompt_embeds": sequence, "pooled_prompt_embeds": pooled}

    def check_cached_conditioning(self, base: BaseModel, batch: dict, options: TextOptions) -> None:
        length, found = self.sequence_length(base, options), batch["prompt_embeds"].shape[1]
        if found != length:
            raise LorafitError(
                f"the data's cached T5 embeddings have {found} tokens, but model.conditioning.max_sequence_length "
                f"{options.max_sequence_length or f'(the default {length})'} needs {length}; run `lorafit cache ... "
                f"--text_embeddings true --max_sequence_length {length}` again, or set it to {found}"
            )

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        made, wanted = cached.get("max_sequence_length"), self.sequence_length(base, options)
        if made is not None and made != wanted:
            raise LorafitError(
                f"data.shards hold T5 embeddings cached with max_sequence_length {made}, but this run reads {wanted} "
                f"tokens; run `lorafit cache ... --text_embeddings true --max_sequence_length {wanted}` again, or set "
                f"model.conditioning.max_sequence_length: {made}"
            )

    def text_layers_used(self, encoder_index: int, num_layers: int, options: TextOptions) -> int:
        return num_layers  # CLIP's pooled output comes after every layer

    # ---- the transformer ---------------------------------------------------------------------

    def latent_size_multiple(self) -> int:
        return 2

    def resolution_shift(self, latent_height: int, latent_width: int, scheduler_config: dict) -> float | None:
        # FluxPipeline's calculate_shift: mu grows linearly with the packed token count between
        # (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); sigmas are shifted by exp(mu).
        tokens = (latent_height // 2) * (latent_width // 2)
        get = scheduler_config.get
        base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
        base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
        mu = base_shift + (max_shift - base_shift) * (tokens - base_len) / (max_len - base_len)
        return math.exp(mu)

    def predict(
        self,
        base: BaseModel,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict,
        options: TextOptions,
    ) -> torch.Tensor:
        transformer = base.denoiser
        dtype = base.denoiser_dtype()
        b, _, h, w = noisy.shape
        if h % 2 or w % 2:
            raise LorafitError(f"Flux packs 2x2 latent patches; latents of {h}x{w} are odd (use bucket steps of 16 px)")
        guidance = None
        if self.guidance_distilled(base):
            guidance = torch.full((b,), float(options.guidance), device=noisy.device, dtype=torch.float32)
        prompt = conditioning["prompt_embeds"].to(dtype)
        out = transformer(
            hidden_states=pack_latents(noisy).to(dtype),
            timestep=timesteps.to(dtype),  # sigmas: FluxPipeline passes t / 1000
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(h, w, noisy.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ---- networks ------------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: the attention projections of double and single blocks; ``attn-mlp``: also the
        feed-forward Linears and the single blocks' ``proj_out`` (attention + MLP output, BFL's
        ``linear2``), the diffusers example's targets plus single blocks; ``full``: every Linear
        of the transformer, modulation (``norm*.linear``), embedders and the final layer included
        (kohya's ``lora_flux`` trains every Linear of the double and single blocks)."""
        if preset not in PRESETS:
            raise LorafitError(f"model.network.preset: {preset!r} is not one of {', '.join(PRESETS)}")
        names = set(adaptable_modules(denoiser))
        if preset == "full":
            return names
        double = _DOUBLE_ATTENTION + (_DOUBLE_MLP if preset == "attn-mlp" else ())
        single = _SINGLE_ATTENTION + (_SINGLE_MLP if preset == "attn-mlp" else ())
        return {
            n
            for n in names
            if (n.startswith("transformer_blocks.") and n.split(".", 2)[2] in double)
            or (n.startswith("single_transformer_blocks.") and n.split(".", 2)[2] in single)
        }

    def kohya_stem(self, component: str, module: str, config: Any = None) -> str:
        if component != "transformer":
            return super().kohya_stem(component, module, config)
        from lorafit.families.flux_layout import diffusers_to_bfl

        found = diffusers_to_bfl(config, self.kohya_prefixes["transformer"]).get(module)
        if found is None:
            raise LorafitError(f"Flux transformer module {module} has no BFL/kohya name")
        return found[0].stem

    def kohya_layout(self, denoiser_config: Any):
        return bfl_modules(denoiser_config, self.kohya_prefixes["transformer"])

    # ---- inference and tests -----------------------------------------------------------------

    def build_pipeline(self, base: BaseModel, scheduler):
        from diffusers import FluxPipeline

        clip, t5 = base.text_encoders
        return FluxPipeline(
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=clip,
            tokenizer=base.tokenizers[0],
            text_encoder_2=t5,
            tokenizer_2=base.tokenizers[1],
            transformer=base.denoiser,
        )

    def native_size(self, base: BaseModel) -> int:
        return 1024

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--g`` is the embedded guidance of guidance-distilled models (3.5 when unset, the pipeline's
        default); ``--l`` is true classifier-free guidance, which FluxPipeline runs only with a negative
        prompt (``--n``), as kohya's Flux sampler does since it split the two."""
        arguments = dict(prompt=prompt, guidance_scale=3.5 if guidance is None else guidance)
        if negative_prompt:
            arguments.update(negative_prompt=negative_prompt, true_cfg_scale=cfg)
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        """FluxPipeline's own ``encode_prompt`` for the prompt (and the negative one for true CFG)."""
        encoded = dict(arguments)
        length = {"max_sequence_length": encoded["max_sequence_length"]} if "max_sequence_length" in encoded else {}
        embeds, pooled, _ = pipe.encode_prompt(prompt=encoded.pop("prompt"), prompt_2=None, device=device, **length)
        encoded.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if "negative_prompt" in encoded:
            negative, negative_pooled, _ = pipe.encode_prompt(
                prompt=encoded.pop("negative_prompt"), prompt_2=None, device=device, **length
            )
            encoded.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return encoded

    def tiny_pipeline(self, seed: int = 0, guidance_embeds: bool = True):
        from lorafit.families.flux_tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(guidance_embeds=guidance_embeds, seed=seed)
