"""A tiny random-weight Stable Diffusion 3.5 pipeline: the real classes (``SD3Transformer2DModel`` with
SD3.5's q/k RMSNorm and Medium's dual-attention (MMDiT-X) first block, CLIP-L and CLIP-G with projections,
a T5 encoder, the 16-channel VAE, the flow-matching scheduler with shift 3) at a size that trains on a
laptop CPU in seconds."""

from __future__ import annotations

import torch

_CLIP_L, _CLIP_G, _T5 = 32, 48, 96  # stand for 768, 1280 and 4096: CLIP-L + CLIP-G features fit in T5's width


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from lorafit.families.flux_tiny import build_t5_tokenizer, tiny_t5_encoder
    from lorafit.families.tiny import _PROJECTION_DIM, _text_config, build_clip_tokenizer, tiny_vae

    torch.manual_seed(seed)
    # CLIP-G's tokenizer pads with "!", CLIP-L's with the end token, as SDXL's and SD3's released ones.
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    t5_tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_encoder(t5_tokenizer, _T5)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5,
        caption_projection_dim=32,  # = the inner width, as 1536 / 2432 in Medium / Large
        pooled_projection_dim=2 * _PROJECTION_DIM,  # CLIP-L's and CLIP-G's projections side by side
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),  # SD3.5 Medium's MMDiT-X blocks have a second image attention
        qk_norm="rms_norm",  # SD3.5's
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(scaling_factor=1.5305, latent_channels=16, shift_factor=0.0609),  # SD3's VAE
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, "quick_gelu", hidden=_CLIP_L)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu", hidden=_CLIP_G)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
