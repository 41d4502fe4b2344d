"""A tiny random-weight FLUX.2 [klein] pipeline: the real classes (``Flux2Transformer2DModel``,
``Qwen3ForCausalLM``, ``AutoencoderKLFlux2`` with BatchNorm statistics, the flow-matching scheduler) at a
size that trains on a laptop CPU in seconds."""

from __future__ import annotations

import torch

_TEXT_HIDDEN = 16
# The pipeline stacks Qwen3's hidden states 9, 18 and 27, so the tiny Qwen3 has the 4 B model's depth
# (at a width of 16) and the transformer reads 3 x 16 features per token (7680 = 3 x 2560 in the 4 B).
_TEXT_LAYERS = 28


def tiny_flux2_klein_pipeline(seed: int = 0, distilled: bool = False):
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from lorafit.families.tiny_qwen import build_qwen_tokenizer, tiny_qwen3

    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels patchified 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_HIDDEN,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim, as (32, 32, 32, 32) does to 128
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8
    )
    with torch.no_grad():  # statistics that differ from the identity, so tests see the normalisation
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=tiny_qwen3(tokenizer, hidden=_TEXT_HIDDEN, layers=_TEXT_LAYERS, causal_lm=True),
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
