"""Chroma (Chroma1-HD, Chroma1-Base): an 8.9 B FLUX.1 [schnell] derivative, ``ChromaTransformer2DModel``.

What differs from FLUX.1, checked against diffusers' ``ChromaPipeline`` (0.42):

- Conditioning: T5-XXL only (no CLIP, no pooled vector), run with the tokenizer's attention mask; the
  transformer then sees the caption's tokens and the *first* padding token, the rest masked
  (lodestone's trainer, ComfyUI, ai-toolkit). diffusers 0.42 builds that mask as floats 0/1, which its
  attention adds to the scores instead of masking (diffusers issue 12116): lorafit passes it as bool,
  in training and to the pipeline for samples, so padding never takes part. Since masked tokens change
  nothing, each caption keeps only its tokens + that one pad, padded per batch (:mod:`llm_text`), and
  ``lorafit cache`` stores exactly those.
- No guidance embedding and no modulation Linears: the approximator (``distilled_guidance_layer``) turns
  the timestep into every block's modulation. Sampling is true CFG against a negative prompt (the
  pipeline's ``guidance_scale``, 3-5 on the model cards; ``--n`` or "").
- Latents, packing, sigma timesteps and the resolution shift are FLUX.1's (Chroma1-HD's scheduler
  config is [dev]'s: 256 -> 0.5, 4096 -> 1.15 tokens).
- Names: kohya/ComfyUI files use the original names, q/k/v fused (:mod:`chroma_layout`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.block_presets import block_preset_modules
from lorafit.families.chroma_layout import original_modules
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.families.flux import image_ids, pack_latents, unpack_latents
from lorafit.families.llm_text import check_cached_length, pad_embeddings, text_only_pipeline

_DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_DOUBLE_ATTENTION += ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
# An original Chroma file (Chroma1-HD.safetensors; diffusers' own detection key) has FLUX.1's blocks and the
# approximator; Chroma Radiance (pixel space) adds nerf_ layers and is another model.
_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight")


class ChromaFamily(Family):
    name: ClassVar[str] = "chroma"
    title: ClassVar[str] = "Chroma"
    objective: ClassVar[str] = "flow"
    denoiser_component: ClassVar[str] = "transformer"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # T5-XXL
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ()  # T5 never trains
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds", "prompt_embeds_mask")
    kohya_prefixes: ClassVar[dict[str, str]] = {"transformer": "lora_unet"}
    clip_components: ClassVar[tuple[str, ...]] = ()
    kohya_aliases: ClassVar[tuple[str, ...]] = ("lora_transformer", "lycoris")  # OneTrainer, SimpleTuner
    load_formats: ClassVar[tuple[str, ...]] = ("hub id", "diffusers directory", "single file + parts")
    kohya_names: ClassVar[str] = "original (BFL) names, q/k/v fused"
    pipeline_class: ClassVar[str] = "ChromaPipeline"
    base_model_version: ClassVar[str] = "chroma"

    @classmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "ChromaTransformer2DModel"

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        plain = {key.removeprefix("model.diffusion_model.") for key in keys}
        return all(marker in plain for marker in _MARKERS) and not any(key.startswith("nerf_") for key in plain)

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "chroma/lora"

    def load_single_file(self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype):
        from lorafit.families.transformer_files import load_transformer_single_file

        # diffusers reads the released width itself; other widths (tiny test models) through lorafit's table.
        return load_transformer_single_file(
            self, path, config, parts, quantization, dtype, vae_file=True, other_width=_other_width
        )

    # ---- conditioning -------------------------------------------------------------------------

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int:
        return options.max_sequence_length or 512  # ChromaPipeline's default

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        from diffusers import ChromaPipeline

        with torch.no_grad():  # T5 is never trained
            embeds, _, mask, *_ = text_only_pipeline(ChromaPipeline, base).encode_prompt(
                list(captions),
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.sequence_length(base, options),
            )
        # The pipeline's mask: the caption's tokens and the first pad (floats); only those are kept.
        prompt_embeds, mask = pad_embeddings([e[m.bool()] for e, m in zip(embeds, mask)])
        return {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": mask}

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        check_cached_length(self.title, cached, self.sequence_length(base, options))

    # ---- the transformer ------------------------------------------------------------------------

    def latent_size_multiple(self) -> int:
        return 2

    def resolution_shift(self, latent_height: int, latent_width: int, scheduler_config: dict) -> float | None:
        import math

        from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

        get = scheduler_config.get  # ChromaPipeline's own mu on the packed token count
        tokens = (latent_height // 2) * (latent_width // 2)
        args = (get("base_image_seq_len", 256), get("max_image_seq_len", 4096))
        return math.exp(calculate_shift(tokens, *args, get("base_shift", 0.5), get("max_shift", 1.15)))

    def predict(self, base, noisy, timesteps, conditioning, batch, options) -> torch.Tensor:
        h, w = noisy.shape[-2:]
        if h % 2 or w % 2:
            raise LorafitError(f"Chroma packs 2x2 latent patches; latents of {h}x{w} are odd (bucket steps of 16 px)")
        embeds, mask = conditioning["prompt_embeds"], conditioning.get("prompt_embeds_mask")
        if mask is None or bool(mask.all()):
            return self._forward(base, noisy, timesteps, embeds, None)
        mask = mask.to(noisy.device).bool()
        if base.denoiser.gradient_checkpointing and torch.is_grad_enabled():
            # diffusers' checkpointed single blocks drop the mask: run each caption alone on its own tokens,
            # which is the masked attention exactly (masked tokens take no part).
            return torch.cat(
                [
                    self._forward(base, noisy[i : i + 1], timesteps[i : i + 1], embeds[i : i + 1, mask[i]], None)
                    for i in range(noisy.shape[0])
                ]
            )
        return self._forward(base, noisy, timesteps, embeds, mask)

    @staticmethod
    def _forward(base: BaseModel, noisy, timesteps, embeds, mask) -> torch.Tensor:
        dtype = base.denoiser_dtype()
        b, _, h, w = noisy.shape
        tokens = pack_latents(noisy).to(dtype)
        if mask is not None:  # ChromaPipeline._prepare_attention_mask: every image token attends
            mask = torch.cat([mask, mask.new_ones(b, tokens.shape[1])], dim=1)
        out = base.denoiser(
            hidden_states=tokens,
            timestep=timesteps.to(dtype),  # sigmas: the pipeline passes t / 1000
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype),
            img_ids=image_ids(h, w, noisy.device, dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ---- networks -------------------------------------------------------------------------------

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """``attn``: the attention projections of the double and single blocks; ``attn-mlp``: every Linear
        of the blocks (their MLPs and the single blocks' ``proj_out``; Chroma's blocks hold no modulation);
        ``full``: every Linear, the approximator, embedders and final layer included."""
        blocks = {"transformer_blocks": (_DOUBLE_ATTENTION, ()), "single_transformer_blocks": (_SINGLE_ATTENTION, ())}
        return block_preset_modules(denoiser, preset, blocks)

    def kohya_layout(self, denoiser_config: Any):
        return original_modules(denoiser_config, self.kohya_prefixes["transformer"])

    # ---- inference and tests ------------------------------------------------------------------

    def native_size(self, base: BaseModel) -> int:
        return 1024

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """``--l`` is the pipeline's true CFG (``guidance_scale``, above 1 to run) against ``--n`` or ""."""
        arguments = dict(prompt=prompt, guidance_scale=cfg)
        if cfg > 1:
            arguments["negative_prompt"] = negative_prompt
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        """The pipeline's ``encode_prompt``, its masks passed back as bool so padding is masked (see above)."""
        encoded = dict(arguments)
        cfg = encoded["guidance_scale"] > 1
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
            encoded.pop("prompt"),
            negative_prompt=encoded.pop("negative_prompt", None) or "",
            device=device,
            do_classifier_free_guidance=cfg,
            **({"max_sequence_length": encoded["max_sequence_length"]} if "max_sequence_length" in encoded else {}),
        )
        encoded.update(prompt_embeds=embeds, prompt_attention_mask=mask.bool())
        if cfg:
            encoded.update(negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask.bool())
        return encoded

    def tiny_pipeline(self, seed: int = 0):
        from lorafit.families.chroma_tiny import tiny_chroma_pipeline

        return tiny_chroma_pipeline(seed=seed)


def _other_width(path: str, config: str, dtype: torch.dtype, quantization: str):
    """The transformer of an original-layout file whose width diffusers' reader does not know (not 3072),
    or None for the released width."""
    from diffusers import ChromaTransformer2DModel

    from lorafit.families.chroma_layout import diffusers_state_dict
    from lorafit.families.transformer_files import read_state_dict

    transformer_config = ChromaTransformer2DModel.load_config(config, subfolder="transformer")
    if transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"] == 3072:
        return None
    if quantization in ("nf4", "int8"):
        raise LorafitError(f"model.quantization: {quantization} needs a Chroma of the released width (3072)")
    # Built on the CPU, not the meta device: its non-persistent modulation table (mod_proj) is computed at init.
    transformer = ChromaTransformer2DModel.from_config(transformer_config)
    try:
        state = diffusers_state_dict(read_state_dict(path, "model.model"), transformer_config)
    except ValueError as error:
        raise LorafitError(f"model.model: {path} does not fit the Chroma config given ({error})") from None
    transformer.load_state_dict(state, strict=True)
    return transformer.to(dtype)
