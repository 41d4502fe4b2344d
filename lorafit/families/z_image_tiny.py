"""A tiny random-weight Z-Image pipeline: the real classes (``ZImageTransformer2DModel``, ``Qwen3Model``,
FLUX.1's 16-channel VAE, the flow-matching scheduler with Z-Image-Turbo's fixed shift 3) at a size that
trains on a laptop CPU in seconds."""

from __future__ import annotations

import torch

_TEXT_HIDDEN = 32  # stands for Qwen3-4B's 2560 (the transformer's cap_feat_dim)


def tiny_z_image_pipeline(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from lorafit.families.tiny import tiny_vae
    from lorafit.families.tiny_qwen import build_qwen_tokenizer, tiny_qwen3

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_TEXT_HIDDEN,
        axes_dims=[4, 6, 6],  # sums to the head dim, as (32, 48, 48) does to 128
        axes_lens=[1024, 64, 64],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=tiny_vae(scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159),  # FLUX.1's VAE
        text_encoder=tiny_qwen3(tokenizer, hidden=_TEXT_HIDDEN),
        tokenizer=tokenizer,
        transformer=transformer,
    )
