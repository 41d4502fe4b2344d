"""Sentence captions from a transformers image-to-text model: BLIP, BLIP-2 and their kind.

Loaded through ``AutoProcessor`` + ``AutoModelForImageTextToText`` (transformers 5's successor of
``AutoModelForVision2Seq``), so any checkpoint whose config maps to an image-to-text head works:
``Salesforce/blip-image-captioning-large`` (kohya's ``make_captions.py`` default),
``Salesforce/blip2-opt-2.7b`` and local folders written by ``save_pretrained``.
Decoding is deterministic (greedy, or beam search with ``num_beams``), unlike kohya's default
nucleus sampling, so re-running the command on the same images gives the same captions.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from lorafit.captioning.hub_access import cache_first
from lorafit.errors import LorafitError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LorafitError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LorafitError(f"--device {device}: no CUDA device here; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (what BLIP checkpoints are published in) and float32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LorafitError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ImageToTextCaptioner:
    """Captions images with a transformers image-to-text model.

    Args:
        model: Hugging Face hub id or local folder of the model and its processor.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        max_new_tokens: Longest caption in tokens (kohya's --max_length, 75).
        num_beams: Beam search width; 1 is greedy decoding (kohya's --beam_search uses 3).
    """

    kind = "image-to-text"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 75,
        num_beams: int = 1,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if max_new_tokens < 1 or num_beams < 1:
            raise LorafitError(
                f"--max_new_tokens and --num_beams must be at least 1; got {max_new_tokens}, {num_beams}"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}

        def load(local_files_only: bool):
            processor = AutoProcessor.from_pretrained(str(model), local_files_only=local_files_only)
            loaded = AutoModelForImageTextToText.from_pretrained(
                str(model), dtype=self.dtype, local_files_only=local_files_only
            )
            return processor, loaded

        try:
            self.processor, self.model = cache_first(str(model), load)
        except (OSError, ValueError, KeyError) as error:
            reason = " ".join(str(error).split())[:240]
            raise LorafitError(
                f"cannot load captioning model --model {model} ({reason}); give a BLIP-style "
                "image-to-text model (hub id or save_pretrained folder) or a WD14 tagger folder"
            ) from None
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, special tokens and surrounding whitespace removed."""
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        # Only the pixels take the model's dtype; token ids must stay integers.
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tokens = self.model.generate(**inputs, **self.generate_kwargs)
        return [" ".join(text.split()) for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
