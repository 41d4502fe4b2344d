"""A tiny random-weight CLIP (model + processor), built offline, for the selection metrics and probe in tests.

It loads through the same ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` path as
``openai/clip-vit-large-patch14``; its similarities are meaningless numbers, but every step that
produces them is the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.families.tiny import build_clip_tokenizer


def save_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32, overwrite: bool = False) -> Path:
    """Write a tiny ``CLIPModel`` and its ``CLIPProcessor`` (byte-level tokenizer) to ``out``.

    Args:
        out: Directory to write.
        seed: Seed of the random weights.
        image_size: Side of the square images the vision tower takes.
        overwrite: Rebuild even if ``out`` already holds one.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        return out
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=8,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)
    return out
