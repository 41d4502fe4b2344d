"""Tiny random-weight pipelines of each real architecture, built offline (SD builders + shared parts).

Tests and the demo load these with the same ``from_pretrained`` code a user's real model takes,
so every loading, family-detection, LoRA-naming and export path is exercised without a model hub.
The layouts keep the features that make the real families differ (SD2's linear projections and
OpenCLIP-style GELU text encoder with v-prediction, SDXL's two text encoders, pooled projection and
``text_time`` micro-conditioning, an 8x VAE) at a size that trains on a laptop CPU in seconds.
Each family's :meth:`~lorafit.families.family.Family.tiny_pipeline` builds its own (the SD ones
from the builders here; transformer families in their modules, from the shared tokenizer and VAE
builders here).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The UNet families, whose tiny pipelines are built here (the original-layout tests use them).
UNET_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")

_TEXT_HIDDEN = 32
# SDXL's second encoder is wider than its first (1280 vs 768), and diffusers' single-file loader
# tells the two apart by width, so the tiny one must differ too.
_TEXT_HIDDEN_2 = 48
_PROJECTION_DIM = 32
_TIME_EMBED_DIM = 8  # SDXL: each of the six micro-conditioning numbers gets this many features


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2/CLIP's byte alphabet).

    transformers 5 no longer exports its helper for this, so it is spelled out: printable Latin-1
    bytes stand for themselves, the rest are shifted past U+0100.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, extra = [], 0
    for byte in range(256):
        if byte not in printable:
            shifted.append(256 + extra)
            extra += 1
    return [chr(c) for c in printable + shifted]


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP tokenizer with no merges: every character is a token.

    transformers 5 builds ``CLIPTokenizer`` from an in-memory vocab and merge list, which is what
    makes this possible offline. The vocabulary is CLIP's byte alphabet (plus its end-of-word forms)
    so any caption tokenizes; the real tokenizers differ only in their learned merges.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length, pad_token=pad_token)


def _text_config(tokenizer, hidden_act: str, projection_dim: int = _PROJECTION_DIM, hidden: int = _TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(scaling_factor: float, latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    # Four levels like the real VAE, so latents are 1/8 of the image side (bucket steps of 64 px
    # stay meaningful); the channel counts are what makes it tiny.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        # Flux's VAE has no quant convs; SD's have them.
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def _sd_unet(cross_attention_dim: int, sd2: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        # SD1 counts heads in ``attention_head_dim`` (a diffusers quirk it keeps for SD1 configs);
        # SD2 gives per-level head dims and uses linear proj_in/proj_out instead of 1x1 convs.
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN_2,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _PROJECTION_DIM,
        norm_num_groups=32,
    )


def _scheduler_kwargs() -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random-weight SDXL pipeline (weights fixed by ``seed``)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    # Real SDXL pads its second (OpenCLIP bigG) tokenizer with "!", not the end token.
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_text_config(tokenizer, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu", hidden=_TEXT_HIDDEN_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**_scheduler_kwargs(), timestep_spacing="leading", steps_offset=1),
    )


def tiny_sd_pipeline(sd2: bool, seed: int = 0):
    """A tiny random-weight SD1.x (epsilon) or SD2.x-768 (v-prediction) pipeline."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    scheduler = (
        DDIMScheduler(
            **_scheduler_kwargs(),
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        if sd2
        else PNDMScheduler(**_scheduler_kwargs(), skip_prk_steps=True, steps_offset=1)
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_text_config(tokenizer, "gelu" if sd2 else "quick_gelu")),
        tokenizer=tokenizer,
        unet=_sd_unet(cross_attention_dim=_TEXT_HIDDEN, sd2=sd2),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """Return a tiny random-weight diffusers pipeline of ``family`` (weights fixed by ``seed``);
    ``flux-schnell`` is the Flux.1 [schnell] layout (no guidance embedding)."""
    from lorafit.families.registry import get_family

    if family == "flux-schnell":  # FLUX.1 [schnell]'s layout: no guidance embedding
        return get_family("flux").tiny_pipeline(seed=seed, guidance_embeds=False)
    return get_family(family, key="family").tiny_pipeline(seed=seed)


def save_tiny_pipeline(family: str, out: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Build a tiny ``family`` pipeline and write it as a diffusers directory (``save_pretrained``).

    Args:
        family: Architecture to imitate: ``sd1`` (SD1.5, epsilon), ``sd2`` (SD2.x-768, v-prediction),
            ``sdxl`` (two text encoders, micro-conditioning), ``flux`` (Flux.1 [dev]: CLIP-L + T5,
            guidance embedding, 16-channel VAE), ``flux-schnell`` (no guidance embedding),
            ``qwen-image`` (Qwen2.5-VL, video VAE), ``z-image`` (Qwen3), ``flux2-klein`` (Qwen3,
            32-channel VAE), ``chroma`` (T5 only, no guidance embedding) or ``sd3`` (SD3.5: CLIP-L,
            CLIP-G and T5); see docs/families.md.
        out: Directory to write; it gets ``model_index.json`` and one folder per component.
        seed: Seed of the random weights; the same seed writes the same tensors.
        overwrite: Rebuild even if ``out`` already holds a pipeline.
    """
    out = Path(out)
    if (out / "model_index.json").exists() and not overwrite:
        return out
    pipe = build_tiny_pipeline(family, seed=seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
