"""The toy Flux base model's parts: FLUX.1's architecture at a size one CPU core trains.

The same classes and wiring as FLUX.1 (``FluxTransformer2DModel`` on 2x2-packed latents with
3-axis RoPE ids, a 16-channel ``AutoencoderKL`` without quant convs and with a ``shift_factor``,
a ``CLIPTextModel`` whose pooled output is the global vector, a ``T5EncoderModel`` whose sequence
is the cross-attention context, ``FlowMatchEulerDiscreteScheduler`` with Flux's resolution-dependent
shift), so lorafit detects it as ``flux`` and every Flux code path (packing, flow-matching
objective, BFL/kohya names, fused-module export, diffusers' ``FluxPipeline``) runs on it. What is
smaller or different, and why:

* 32x32 pictures and a 4x VAE (like the SD toy base), so latents are 16x8x8 and the transformer
  sees 4x4 = 16 image tokens;
* 2 double-stream + 2 single-stream blocks of width 128 (4 heads of 32) instead of 19 + 38 of 3072;
* no guidance embedding (FLUX.1 [schnell]'s layout): [dev]'s embedding is distilled from a
  classifier-free-guided teacher, a second training run the toy does not need; sampling uses
  true classifier-free guidance instead (``true_cfg_scale`` with an empty negative prompt);
* a 16-token context for both encoders (the captions are 8 T5 tokens), declared as the
  tokenizers' ``model_max_length``; generation must read 16 T5 tokens too (``max_sequence_length``).
"""

from __future__ import annotations

from lorafit.toyworld.architecture import TEXT_WIDTH, VAE_CHANNELS, toy_text_encoder
from lorafit.toyworld.tokenizer import MODEL_MAX_LENGTH, PUNCTUATION, RARE_WORDS, WORLD_WORDS
from lorafit.toyworld.world import RESOLUTION

FLUX_LATENT_CHANNELS = 16  # FLUX.1's VAE: 16 channels, packed 2x2 into 64-wide tokens
T5_WIDTH = 64
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM = 4, 32  # width 128
DOUBLE_BLOCKS, SINGLE_BLOCKS = 2, 2
# RoPE dimensions per id axis (text/unused, row, column); they sum to the head dimension, as
# FLUX.1's (16, 56, 56) sum to 128.
ROPE_AXES = (8, 12, 12)
SEQUENCE_LENGTH = MODEL_MAX_LENGTH  # T5 tokens per caption, in training and at generation


def toy_flux_vae(scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """An untrained 16-channel VAE laid out as FLUX.1's (no quant convs; ``shift_factor`` and
    ``scaling_factor`` are measured after training: the latents' mean and 1 / std)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=FLUX_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,  # as the SD toy VAE: attention at 8x8 adds little for flat shapes
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_world_t5_tokenizer(model_max_length: int = SEQUENCE_LENGTH):
    """A ``T5Tokenizer`` (SentencePiece Unigram) whose whole-word pieces are the toy world's words.

    The same vocabulary as the CLIP tokenizer (:mod:`lorafit.toyworld.tokenizer`): world words,
    the held-out shape's name and the rare trigger words are one piece each (``▁red``); any other
    lowercase word falls apart into letters, as rare words fall apart into pieces in the real T5
    vocabulary. Unigram picks the most probable split, so a word piece (log-probability -1) always
    beats its letters (-2 each, plus the word marker's -1).
    """
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(f"▁{word}", -1.0) for word in WORLD_WORDS + RARE_WORDS]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + "".join(PUNCTUATION)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def toy_t5_encoder(tokenizer=None):
    """An untrained T5 v1.1-style encoder (gated GELU, relative position buckets)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tokenizer or build_world_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=SEQUENCE_LENGTH,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def toy_clip_text_encoder(tokenizer=None):
    """An untrained CLIP text encoder: its pooled output is Flux's global vector (CLIP-L's role)."""
    return toy_text_encoder(tokenizer)


def toy_flux_transformer():
    """An untrained ``FluxTransformer2DModel`` for 16x8x8 latents (see module docstring)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,  # 2x2 latent patches packed into one token
        num_layers=DOUBLE_BLOCKS,
        num_single_layers=SINGLE_BLOCKS,
        attention_head_dim=TRANSFORMER_HEAD_DIM,
        num_attention_heads=TRANSFORMER_HEADS,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=ROPE_AXES,
    )


def scheduler_config() -> dict:
    """FLUX.1 [dev]'s sampler settings: Euler on sigmas shifted by ``exp(mu)``, ``mu`` linear in the
    packed token count (16 tokens here: shift 1.58), the shift lorafit trains Flux with."""
    return dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def assemble_flux_pipeline(vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer):
    """The parts as a diffusers ``FluxPipeline``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
