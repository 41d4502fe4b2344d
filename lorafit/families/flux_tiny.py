"""A tiny random-weight FLUX.1 pipeline: the real classes (``FluxTransformer2DModel``, CLIP-L, T5
encoder, a 16-channel VAE with a shift factor, the flow-matching scheduler) at a size that trains
on a laptop CPU in seconds, so tests drive the real loading, conditioning and export code offline.
"""

from __future__ import annotations

import string

import torch

_TEXT_HIDDEN = 32  # CLIP-L's width stands for pooled_projection_dim, T5's for joint_attention_dim


def build_t5_tokenizer(model_max_length: int = 512):
    """A character-level T5 (Unigram) tokenizer built in memory: every printable ASCII character
    and SentencePiece's word marker is a piece, so any caption tokenizes; the real one differs in
    its learned pieces only."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.printable if c.isprintable() and c != " "]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(tokenizer, width: int):
    """A 2-layer T5 v1.1 encoder (gated-GELU, as T5-XXL) of ``width`` for ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def tiny_flux_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """Tiny Flux.1: [dev]-like with a guidance embedding, [schnell]-like without."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from lorafit.families.tiny import _text_config, build_clip_tokenizer, tiny_vae

    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_encoder(t5_tokenizer, _TEXT_HIDDEN)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        pooled_projection_dim=_TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as (16, 56, 56) does to 128
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_text_config(clip_tokenizer, "quick_gelu")),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
