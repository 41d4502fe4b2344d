"""A tiny random-weight Chroma pipeline: the real classes (``ChromaTransformer2DModel`` with its approximator,
a T5 encoder, FLUX.1's 16-channel VAE, the flow-matching scheduler with Chroma1-HD's settings) at a size
that trains on a laptop CPU in seconds."""

from __future__ import annotations

import torch

_TEXT_HIDDEN = 32  # stands for T5-XXL's 4096 (the transformer's joint_attention_dim)


def tiny_chroma_pipeline(seed: int = 0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from lorafit.families.flux_tiny import build_t5_tokenizer, tiny_t5_encoder
    from lorafit.families.tiny import tiny_vae

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_encoder(tokenizer, _TEXT_HIDDEN)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
        approximator_num_channels=16,  # 64 in Chroma1-HD
        approximator_hidden_dim=32,  # 5120 in Chroma1-HD
        approximator_layers=2,  # 5 in Chroma1-HD
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # Chroma1-HD's scheduler_config (FLUX.1 [dev]'s)
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return ChromaPipeline(
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159),  # FLUX.1's VAE
        text_encoder=t5,
        tokenizer=tokenizer,
        transformer=transformer,
    )
