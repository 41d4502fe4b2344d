"""The toy base model's parts: Stable Diffusion 1.5's architecture at a size one CPU core trains.

Same classes and the same wiring as SD1.5 (``AutoencoderKL``, ``CLIPTextModel`` with a
``CLIPTokenizer``, ``UNet2DConditionModel`` with cross-attention, epsilon prediction on SD's
scaled-linear noise schedule), so lorafit detects it as ``sd1`` and every SD1.5 code path (LoRA
target names, kohya export, diffusers loading) runs on it unchanged. What is smaller:

* images are 32x32 and the VAE downsamples 4x (two downsampling stages instead of three), so
  latents are 8x8 (with 8 channels, see ``LATENT_CHANNELS``);
* the text encoder is 2 layers of width 64 over a 16-token context (see ``tokenizer.py``);
* the UNet has two levels (32 and 64 channels) with one ResNet + transformer per level.
"""

from __future__ import annotations

from lorafit.toyworld.tokenizer import build_world_tokenizer
from lorafit.toyworld.world import RESOLUTION

TEXT_WIDTH = 64
# Eight latent channels instead of SD1.5's four: at 4x downsampling a four-channel latent of a
# 32 px picture is too coarse to keep a star's points (measured: the judge recognised 25% of the
# reconstructed stars); eight keeps them. Every SD code path reads the count from the configs.
LATENT_CHANNELS = 8
VAE_CHANNELS = (16, 32, 32)  # three levels -> two 2x downsamplings -> 8x8 latents of a 32x32 image
UNET_CHANNELS = (32, 64)
LATENT_SIZE = RESOLUTION // 2 ** (len(VAE_CHANNELS) - 1)


def toy_vae(scaling_factor: float = 1.0):
    """An untrained VAE (``scaling_factor`` is measured after training: 1 / latent std)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        # Attention at 8x8 adds little for flat shapes and costs a third of the VAE's time.
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )


def toy_text_encoder(tokenizer=None):
    """An untrained CLIP text encoder sized for the world's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tokenizer or build_world_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",  # SD1.5's CLIP ViT-L/14 activation
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def toy_unet():
    """An untrained SD1-style UNet for 4x8x8 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # SD1 configs use this key for the number of heads (a diffusers quirk)
        norm_num_groups=16,
    )


def scheduler_kwargs() -> dict:
    """SD1.5's training noise schedule."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def toy_scheduler():
    """The pipeline's sampler: DDIM as SD1.5 configures it (few steps suffice for 8x8 latents)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """The parts as a ``StableDiffusionPipeline`` (no safety checker: nothing to check here)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=toy_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
