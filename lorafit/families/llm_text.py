"""What the families conditioned by an LLM (Qwen2.5-VL, Qwen3) share: captions of different lengths,
a token budget, and a text-only view of the pipeline.

Training must condition exactly as the family's diffusers pipeline does at inference, so captions are
encoded by the pipeline's own ``encode_prompt`` (chat template, hidden-state layer, dropped template
tokens), run on a pipeline object that holds only the tokenizer and text encoder. What it returns is
brought to one shape: ``prompt_embeds`` [B, L, D] padded with zeros at the end to the batch's longest
caption and ``prompt_embeds_mask`` [B, L] (bool) marking the real tokens. ``lorafit cache`` stores each
caption's real tokens only and the data loader pads a batch again, so cached and encoded batches are
the same tensors.

These text encoders are never trained: kohya's musubi-tuner, ai-toolkit and the diffusers examples keep
them frozen (7-8 B parameters, and the conditioning is read from hidden states, not a trained head).
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError


def text_only_pipeline(pipeline_class, base):
    """``pipeline_class`` over ``base``'s tokenizer and text encoder only (no weights are copied), so its
    ``encode_prompt`` runs without a transformer or VAE."""
    return pipeline_class(
        scheduler=None, vae=None, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], transformer=None
    )


def pad_embeddings(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions' [L_i, D] hidden states -> ([B, L, D] zero-padded at the end, bool mask [B, L])."""
    longest = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.zeros(len(embeds), longest, dtype=torch.bool, device=padded.device)
    for i, e in enumerate(embeds):
        mask[i, : e.shape[0]] = True
    return padded, mask


def token_mask(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The bool mask [B, L] of ``embeds`` [B, L, D]: ``mask``, or all True where a pipeline gave None."""
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    return mask.to(device=embeds.device, dtype=torch.bool)


def check_cached_length(title: str, cached: dict, wanted: int) -> None:
    """Refuse a cache made with another ``max_sequence_length`` (one line saying how to re-cache)."""
    made = cached.get("max_sequence_length")
    if made is not None and made != wanted:
        raise LorafitError(
            f"data.shards hold {title} text embeddings cached with max_sequence_length {made}, but this run reads "
            f"{wanted} tokens; run `lorafit cache ... --text_embeddings true --max_sequence_length {wanted}` again, "
            f"or set model.conditioning.max_sequence_length: {made}"
        )
