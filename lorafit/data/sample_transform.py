"""One drawn sample -> training tensors: bucket, decode, resize, crop, augment, caption ops.

Everything random here comes from a generator seeded by the sample's place in the epoch (not by
the worker that happens to read it), so a run gives the same crops, flips and captions whatever
the number of workers or ranks, and a resumed epoch repeats the interrupted one exactly.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from lorafit.data.buckets import BucketChoice, Size, make_bucket_table, select_bucket
from lorafit.data.captions import CaptionOps
from lorafit.data.images import decode_rgb_with_fixes
from lorafit.data.masks import MEMBER as MASK_MEMBER
from lorafit.data.masks import decode_member, resize_mask
from lorafit.data.resize_crop import plan_resize_crop
from lorafit.data.shard_index import IMAGE_EXTS
from lorafit.errors import LorafitError

# kohya's color_aug is a hue shift of up to 8 on OpenCV's 0..180 hue circle.
HUE_SHIFT = 8 / 180


@dataclass(frozen=True)
class BucketSpec:
    """The bucket settings of the data config, turned into a pure ``(w, h) -> bucket`` choice."""

    resolution: int
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    enable_bucket: bool = True

    def table(self) -> list[Size]:
        if not self.enable_bucket:
            return [(self.resolution, self.resolution)]
        return make_bucket_table(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)

    def chooser(self):
        """A memoised ``entry -> BucketChoice`` (datasets repeat sizes; a table scan per sample is waste)."""
        table = self.table()
        memo: dict[tuple[int, int], BucketChoice] = {}

        def choose(entry: tuple) -> BucketChoice:
            if len(entry) >= 6:  # cached latents: the bucket was fixed when they were encoded
                bucket = (entry[4], entry[5])
                return BucketChoice(bucket, bucket, 0.0)
            size = (entry[0], entry[1])
            if size not in memo:
                memo[size] = select_bucket(
                    *size,
                    table=table,
                    no_upscale=self.bucket_no_upscale and self.enable_bucket,
                    max_area=self.resolution**2,
                    bucket_reso_steps=self.bucket_reso_steps,
                )
            return memo[size]

        return choose


@dataclass(frozen=True)
class SampleTransform:
    """How a drawn sample becomes training tensors (the augmentation half of the data config)."""

    captions: CaptionOps
    crop: Literal["center", "random"] = "center"
    flip_aug: bool = False
    color_aug: bool = False

    def caption(self, sample: dict, rng: random.Random, is_reg: bool) -> str:
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
        return self.captions.apply(text, rng, is_reg)

    def pixels(self, sample: dict, choice: BucketChoice, rng: random.Random, name: str):
        """``(tensor [3, H, W] in [-1, 1], original (h, w), crop (top, left))`` for one sample."""
        tensor, _, original, crop = self.pixels_and_mask(sample, choice, rng, name)
        return tensor, original, crop

    def pixels_and_mask(self, sample: dict, choice: BucketChoice, rng: random.Random, name: str):
        """:meth:`pixels` and the sample's loss mask ([1, H, W] in [0, 1], None without one), resized,
        cropped and flipped exactly as the image (the same draws, whether or not there is a mask)."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise LorafitError(f"{name} has no image member ({', '.join(IMAGE_EXTS)}); re-run lorafit prepare")
        image = decode_rgb_with_fixes(io.BytesIO(sample[ext]), name, draft_size=choice.resized_size).image
        mask = decode_member(sample[MASK_MEMBER]) if MASK_MEMBER in sample else None
        meta = json.loads(sample["json"]) if "json" in sample else {}
        width, height = meta.get("w", image.width), meta.get("h", image.height)
        plan = plan_resize_crop(
            width, height, *choice.bucket, crop=self.crop, rng=rng, resized_size=choice.resized_size
        )
        if image.size != plan.resized_size:
            shrinking = plan.resized_size[0] < image.width
            resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
            image = image.resize(plan.resized_size, resample=resample)
        image = image.crop(plan.crop_box)
        if mask is not None:
            mask = resize_mask(mask, plan.resized_size).crop(plan.crop_box)
        crop_top_left = plan.crop_top_left
        if self.flip_aug and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = None if mask is None else mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop_top_left = plan.flipped_crop_top_left
        if self.color_aug:
            image = _shift_hue(image, rng.uniform(-HUE_SHIFT, HUE_SHIFT))
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return tensor, None if mask is None else mask_tensor(mask), plan.original_size, crop_top_left


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """An ``L`` mask as float [1, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).unsqueeze(0).float().div_(255.0)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.uint8).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks drawn samples (all of one bucket) into the batch contract of lorafit.training.module."""
    batch: dict[str, Any] = {
        "captions": [item["caption"] for item in items],
        "original_size": torch.tensor([item["original_size"] for item in items], dtype=torch.long),
        "crop_top_left": torch.tensor([item["crop_top_left"] for item in items], dtype=torch.long),
        "is_reg": torch.tensor([item["is_reg"] for item in items], dtype=torch.bool),
        "keys": [item["key"] for item in items],
    }
    if "meta" in items[0]:
        batch["metas"] = [item["meta"] for item in items]
    if "prompt_embeds_mask" in items[0]:  # LLM text encoders: each caption's own length, padded per batch
        _pad_to_longest(items)
    lengths = sorted({item["prompt_embeds"].shape[0] for item in items if "prompt_embeds" in item})
    if len(lengths) > 1:  # one cache has one length; data.shards mixing two caches would fail in torch.stack
        raise LorafitError(
            f"a batch holds cached text embeddings of {lengths} token positions: data.shards mix "
            "caches made with different --max_token_length; cache all shards with the same one"
        )
    for name in ("pixel_values", "latent_moments", *CACHED_CONDITIONING):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    if any(item.get("loss_mask") is not None for item in items):
        # Samples without a mask (regularization images, unmasked ones) count everywhere.
        size = next(item["loss_mask"] for item in items if item.get("loss_mask") is not None).shape
        batch["loss_mask"] = torch.stack(
            [item["loss_mask"] if item.get("loss_mask") is not None else torch.ones(size) for item in items]
        )
    return batch


# Cached conditioning tensors a sample may carry (families' ``conditioning_keys``), as ``<key>.pth``.
CACHED_CONDITIONING = ("prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask")


def _pad_to_longest(items: list[dict[str, Any]]) -> None:
    """Zero-pad cached ``prompt_embeds`` (and their masks) to the batch's longest caption, in place:
    what the family's text encoding does for a batch of captions of different lengths."""
    longest = max(item["prompt_embeds"].shape[0] for item in items)
    for item in items:
        missing = longest - item["prompt_embeds"].shape[0]
        if missing:
            embeds, mask = item["prompt_embeds"], item["prompt_embeds_mask"]
            item["prompt_embeds"] = torch.cat([embeds, embeds.new_zeros(missing, *embeds.shape[1:])])
            item["prompt_embeds_mask"] = torch.cat([mask, mask.new_zeros(missing)])


def decode_tensor(data: bytes) -> torch.Tensor:
    """A tensor stored by ``lorafit cache`` (``torch.save`` of a plain tensor)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def pick_cached(sample: dict, rng: random.Random, flip_aug: bool):
    """``(latent moments, crop, loss mask)`` of a cached sample: the flipped variant half the time when
    ``flip_aug``; the mask (cached at the crop's pixels) flipped with it, None without one."""
    meta = json.loads(sample["json"])
    mask = mask_tensor(decode_member(sample[MASK_MEMBER])) if MASK_MEMBER in sample else None
    if flip_aug and "latent_flip.pth" in sample and rng.random() < 0.5:
        flipped = None if mask is None else mask.flip(-1)
        return decode_tensor(sample["latent_flip.pth"]), meta["crop_top_left_flip"], flipped
    return decode_tensor(sample["latent.pth"]), meta["crop_top_left"], mask
