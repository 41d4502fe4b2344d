"""Text and micro-conditioning for the UNet, per family, the way the diffusers pipelines do it.

Training must condition the UNet exactly as inference will, or the LoRA learns for inputs it
never sees at generation time. So this mirrors ``StableDiffusion(XL)Pipeline.encode_prompt``:
SD1/SD2 use the last hidden state (or an earlier layer through ``clip_skip``, re-normalised as
A1111 and kohya do); SDXL concatenates the penultimate hidden states of both encoders and takes
the pooled projection of the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TextConditioning:
    """What the UNet receives from the captions."""

    hidden_states: torch.Tensor
    pooled: Optional[torch.Tensor] = None  # SDXL only


def tokenize(tokenizers: list, captions: list[str], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Pad/truncate every caption to each tokenizer's context length (77 for CLIP)."""
    return [
        tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        for tokenizer in tokenizers
    ]


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no ``.text_model``); transformers 4 nests it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_tokens(family: str, text_encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
    """Run the text encoder(s) on token ids.

    Args:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        text_encoders: One encoder (SD1/2) or two (SDXL: CLIP-L, then OpenCLIP bigG with projection).
        input_ids: Token ids per encoder, as returned by :func:`tokenize`.
        clip_skip: SD1/2 only: 1 = last layer, 2 = penultimate (A1111's "clip skip"). SDXL always
            uses the penultimate layer, as its pipeline does.
    """
    if family == "sdxl":
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, input_ids):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
        return TextConditioning(hidden_states=torch.cat(hidden, dim=-1), pooled=pooled)
    encoder, ids = text_encoders[0], input_ids[0]
    if clip_skip <= 1:
        return TextConditioning(hidden_states=encoder(ids)[0])
    out = encoder(ids, output_hidden_states=True)
    return TextConditioning(hidden_states=_final_layer_norm(encoder)(out.hidden_states[-clip_skip]))


def text_layers_used(family: str, encoder_index: int, num_layers: int, clip_skip: int = 1) -> int:
    """How many of a text encoder's transformer layers :func:`encode_tokens` reads, counted from the input.

    The layers after them cannot change the conditioning, so LoRA on them gets no gradient: kept
    trainable, DDP would fail on parameters "not used in producing the loss".

    Args:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        encoder_index: 0 for the first text encoder, 1 for SDXL's second.
        num_layers: The encoder's ``config.num_hidden_layers``.
        clip_skip: As in :func:`encode_tokens`.
    """
    if family == "sdxl":
        # hidden_states[-2] skips the last layer; the second encoder's pooled output still uses it.
        return num_layers if encoder_index == 1 else num_layers - 1
    # hidden_states[-k] is the output of layer num_layers - k (0-based): layers 0..num_layers-k.
    return num_layers - max(clip_skip, 1) + 1


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample.

    Args:
        original_size: [B, 2] source image (height, width) before resizing.
        crop_top_left: [B, 2] (top, left) of the crop in the resized image.
        target_size: (height, width) of the training image.
    """
    batch = original_size.shape[0]
    target = torch.tensor(target_size, device=original_size.device).expand(batch, 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(dtype)
