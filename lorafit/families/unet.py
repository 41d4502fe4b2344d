"""What the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) share: CLIP text conditioning, the
UNet call, DDPM training on the model's own beta schedule, and kohya's block-class target presets.

The presets pick modules the way kohya and LyCORIS do, by the class of the block they sit in, so
they mean the same on SD1, SD2 and SDXL (and on the tiny test models):

- ``attn``: the attention projections ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
  transformer block (self- and cross-attention). lorafit's default; what diffusers' examples train.
- ``attn-mlp``: every Linear and 1x1 conv inside ``Transformer2DModel`` blocks — attention,
  feed-forward (``ff.net.0.proj``, ``ff.net.2``) and ``proj_in``/``proj_out``. kohya's default
  ``networks.lora`` targets.
- ``full``: ``attn-mlp`` plus every Linear/conv of ``ResnetBlock2D``, ``Downsample2D`` and
  ``Upsample2D`` blocks, ``conv_in``, ``conv_out`` and the time embedding. LyCORIS's ``full`` preset.

Network type ``locon`` adds the ResNet/Down/Upsample blocks to ``attn``/``attn-mlp``, as kohya's
``networks.lora`` does once ``conv_dim`` is set.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.families.clip_text import caption_chunks, encode_tokens, hidden_length, text_layers_used, tokenize
from lorafit.families.family import BaseModel, Family, TextOptions, adaptable_modules, modules_inside

TARGET_PRESETS = ("attn", "attn-mlp", "full")
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_FULL_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def unet_preset_modules(unet: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
    """Module names a UNet ``preset`` selects; ``with_conv_blocks`` adds ResNet/Down/Upsample (LoCon)."""
    if preset not in TARGET_PRESETS:
        raise LorafitError(f"model.network.preset: {preset!r} is not one of {', '.join(TARGET_PRESETS)}")
    transformer = modules_inside(unet, _TRANSFORMER_BLOCKS)
    if preset == "attn":
        names = {n for n in transformer if n.endswith(tuple(f".{p}" for p in _ATTENTION_PROJECTIONS))}
    else:
        names = set(transformer)
    if preset == "full" or with_conv_blocks:
        names |= modules_inside(unet, _CONV_BLOCKS)
    if preset == "full":
        names |= {n for n in adaptable_modules(unet) if n in _FULL_NAMES}
    return names


class UNetFamily(Family):
    """SD1.x / SD2.x / SDXL: a ``UNet2DConditionModel`` conditioned on CLIP hidden states."""

    objective: ClassVar[str] = "ddpm"
    denoiser_component: ClassVar[str] = "unet"

    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        ids = tokenize(base.tokenizers, captions, device, options.max_token_length)
        text = encode_tokens(self.name, list(base.text_encoders), ids, options.clip_skip)
        out = {"prompt_embeds": text.hidden_states}
        if text.pooled is not None:
            out["pooled_prompt_embeds"] = text.pooled
        return out

    def check_cached_conditioning(self, base: BaseModel, batch: dict, options: TextOptions) -> None:
        # The benchmark's random-weight models have no tokenizer: their embeddings are synthetic.
        if not base.tokenizers:
            return
        length = hidden_length(base.tokenizers[0], options.max_token_length)
        found = batch["prompt_embeds"].shape[1]
        if found != length:
            wanted = options.max_token_length or "empty (75 tokens)"
            redo = (
                f"run `lorafit cache ... --text_embeddings true --max_token_length {options.max_token_length}` again"
                if options.max_token_length
                else "run `lorafit cache ... --text_embeddings true` again without --max_token_length"
            )
            raise LorafitError(
                f"the data's cached text embeddings have {found} token positions, but "
                f"model.conditioning.max_token_length {wanted} needs {length}; {redo}"
            )

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        tokenizer = base.tokenizers[0]
        made, wanted = cached.get("max_token_length"), options.max_token_length  # absent: 75 tokens
        # Compare chunk counts: 100 and 150 both read two 75-token chunks and encode identically.
        if caption_chunks(tokenizer, made) != caption_chunks(tokenizer, wanted):
            redo = (
                f"run `lorafit cache ... --text_embeddings true --max_token_length {wanted}` again"
                if wanted
                else "run `lorafit cache ... --text_embeddings true` again without --max_token_length"
            )
            keep = (
                f"or set model.conditioning.max_token_length: {made}"
                if made
                else "or leave model.conditioning.max_token_length empty"
            )
            raise LorafitError(
                f"data.shards hold text embeddings cached with max_token_length {made or '75 (none given)'}, but "
                f"model.conditioning.max_token_length is {wanted or 'empty (75 tokens)'}; {redo}, {keep}"
            )
        if self.name != "sdxl" and cached.get("clip_skip", 1) != options.clip_skip:
            made_skip = cached.get("clip_skip", 1)
            raise LorafitError(
                f"data.shards hold text embeddings cached with clip_skip {made_skip}, but "
                f"model.conditioning.clip_skip is {options.clip_skip}; run `lorafit cache ... --text_embeddings true "
                f"--clip_skip {options.clip_skip}` again, or set model.conditioning.clip_skip: {made_skip}"
            )

    def added_conditioning(self, base: BaseModel, noisy: torch.Tensor, conditioning: dict, batch: dict):
        """``added_cond_kwargs`` of the UNet call (SDXL's micro-conditioning); None for SD1/SD2."""
        return None

    def predict(
        self,
        base: BaseModel,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict,
        options: TextOptions,
    ) -> torch.Tensor:
        unet, dtype = base.denoiser, base.denoiser_dtype()
        added = self.added_conditioning(base, noisy, conditioning, batch)
        hidden = conditioning["prompt_embeds"].to(dtype)
        return unet(noisy.to(dtype), timesteps, hidden, added_cond_kwargs=added).sample

    def text_layers_used(self, encoder_index: int, num_layers: int, options: TextOptions) -> int:
        return text_layers_used(self.name, encoder_index, num_layers, options.clip_skip)

    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        return unet_preset_modules(denoiser, preset, with_conv_blocks)

    def native_size(self, base: BaseModel) -> int:
        return int(base.denoiser.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1))
