"""Text and micro-conditioning for the UNet, per family, the way the diffusers pipelines do it.

Training must condition the UNet exactly as inference will, or the LoRA learns for inputs it
never sees at generation time. So this mirrors ``StableDiffusion(XL)Pipeline.encode_prompt``:
SD1/SD2 use the last hidden state (or an earlier layer through ``clip_skip``, re-normalised as
A1111 and kohya do); SDXL concatenates the penultimate hidden states of both encoders and takes
the pooled projection of the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    """What the UNet receives from the captions."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL only


def tokenize(
    tokenizers: list, captions: list[str], device: torch.device | str = "cpu", max_token_length: int | None = None
) -> list[torch.Tensor]:
    """Token ids per tokenizer: [B, 77] (CLIP's context, longer captions truncated), or with
    ``max_token_length`` (kohya's 150/225) [B, n, 77]: n chunks of 75 caption tokens, each framed
    by its own start and end token, as kohya tokenizes long captions."""
    if not max_token_length:
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
    return [_chunked_ids(tokenizer, captions, max_token_length).to(device) for tokenizer in tokenizers]


def caption_chunks(tokenizer, max_token_length: int | None) -> int:
    """How many chunks of ``model_max_length - 2`` (75) caption tokens :func:`tokenize` makes: 1 without
    ``max_token_length``, 2 for kohya's 150, 3 for 225."""
    body = tokenizer.model_max_length - 2
    return -(-(max_token_length or body) // body)


def hidden_length(tokenizer, max_token_length: int | None) -> int:
    """Token positions of the hidden states :func:`encode_tokens` returns: 77 without
    ``max_token_length``, else the joined chunks' 1 + 75n + 1 (152 for 150, 227 for 225)."""
    return caption_chunks(tokenizer, max_token_length) * (tokenizer.model_max_length - 2) + 2


def _chunked_ids(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    body = tokenizer.model_max_length - 2  # caption tokens per chunk (75 for CLIP)
    chunks = caption_chunks(tokenizer, max_token_length)
    ids = tokenizer(
        list(captions), padding="max_length", max_length=chunks * body + 2, truncation=True, return_tensors="pt"
    ).input_ids
    start, last = ids[:, :1], ids[:, -1:]  # last: the end token, or padding when the caption is short
    framed = []
    for k in range(chunks):
        chunk = torch.cat([start, ids[:, 1 + k * body : 1 + (k + 1) * body], last], dim=1)
        # Tokenizers that pad with a token other than the end token (SD2, SDXL's second): a chunk
        # cut inside the caption must still end with the end token, and an empty chunk must read
        # as an empty prompt ("<start><end><pad>...") rather than as padding only.
        stops = (tokenizer.eos_token_id, tokenizer.pad_token_id)
        cut = ~torch.isin(chunk[:, -2], torch.tensor(stops))
        chunk[cut, -1] = tokenizer.eos_token_id
        empty = chunk[:, 1] == tokenizer.pad_token_id
        chunk[empty, 1] = tokenizer.eos_token_id
        framed.append(chunk)
    return torch.stack(framed, dim=1)


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 flattened CLIPTextModel (no ``.text_model``); transformers 4 nests it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_tokens(
    family: str, text_encoders: list, input_ids: list[torch.Tensor], clip_skip: int = 1
) -> TextConditioning:
    """Run the text encoder(s) on token ids.

    Args:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        text_encoders: One encoder (SD1/2) or two (SDXL: CLIP-L, then OpenCLIP bigG with projection).
        input_ids: Token ids per encoder, as returned by :func:`tokenize`.
        clip_skip: SD1/2 only: 1 = last layer, 2 = penultimate (A1111's "clip skip"). SDXL always
            uses the penultimate layer, as its pipeline does.
    """
    if input_ids[0].dim() == 3:
        return _encode_chunks(family, text_encoders, input_ids, clip_skip)
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


def _encode_chunks(family: str, text_encoders: list, input_ids: list[torch.Tensor], clip_skip: int) -> TextConditioning:
    """Long captions (``tokenize(..., max_token_length)``): every chunk is encoded on its own and the
    hidden states joined as kohya does: the first chunk's start token, each chunk's caption tokens,
    the last chunk's end token (1 + 75n + 1 positions). SDXL's pooled embedding is the first
    chunk's, as in kohya."""
    batch, chunks, context = input_ids[0].shape
    flat = encode_tokens(family, text_encoders, [ids.reshape(batch * chunks, context) for ids in input_ids], clip_skip)
    hidden = flat.hidden_states.reshape(batch, chunks, context, -1)
    joined = torch.cat(
        [hidden[:, 0, :1], hidden[:, :, 1:-1].reshape(batch, chunks * (context - 2), -1), hidden[:, -1, -1:]], dim=1
    )
    pooled = None if flat.pooled is None else flat.pooled.reshape(batch, chunks, -1)[:, 0]
    return TextConditioning(hidden_states=joined, pooled=pooled)


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


def sdxl_time_ids(
    original_size: torch.Tensor,
    crop_top_left: torch.Tensor,
    target_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample.

    Args:
        original_size: [B, 2] source image (height, width) before resizing.
        crop_top_left: [B, 2] (top, left) of the crop in the resized image.
        target_size: (height, width) of the training image.
    """
    # Filled on the device: torch.tensor(target_size, device=...) would be a blocking host-to-GPU copy.
    target = torch.empty_like(original_size)
    target[:, 0], target[:, 1] = target_size
    return torch.cat([original_size, crop_top_left, target], dim=1).to(dtype)
