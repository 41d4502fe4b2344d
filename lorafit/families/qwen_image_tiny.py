"""A tiny random-weight Qwen-Image pipeline: the real classes (``QwenImageTransformer2DModel``,
Qwen2.5-VL, ``AutoencoderKLQwenImage``, the flow-matching scheduler with Qwen-Image's dynamic shift) at
a size that trains on a laptop CPU in seconds."""

from __future__ import annotations

import torch

_TEXT_HIDDEN = 32  # stands for Qwen2.5-VL-7B's 3584 (the transformer's joint_attention_dim)


def tiny_qwen_image_pipeline(seed: int = 0):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from lorafit.families.tiny_qwen import build_qwen_tokenizer, tiny_qwen25_vl

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    # Qwen-Image's scheduler config: exponential time shift between 256 and 8192 tokens, shift_terminal 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_qwen25_vl(tokenizer, hidden=_TEXT_HIDDEN),
        tokenizer=tokenizer,
        transformer=transformer,
    )
