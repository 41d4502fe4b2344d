"""``lorafit cache``'s encoding step: source samples, in source order, to VAE moments and text embeddings.

The VAE takes batches of one bucket size, but the cache must keep the source's sample order (see
:mod:`lorafit.data.cache`). So samples are read in windows of a few batches' worth, grouped by
bucket inside the window (the bucket is in the index: no decoding needed to group), encoded,
and handed on in source order. The window bounds the memory (the raw bytes of its samples and
their encodings); with the handful of buckets a dataset uses, most VAE calls still get full batches.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch

from lorafit.data.captions import CaptionOps
from lorafit.data.masks import MEMBER as MASK_MEMBER
from lorafit.data.sample_transform import BucketSpec, SampleTransform, collate
from lorafit.data.shard_index import DatasetIndex
from lorafit.data.shard_reader import read_indexed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WINDOW_BATCHES = 16  # batches' worth of samples grouped by bucket at a time


@dataclass
class CachedSample:
    """One encoded sample: its source shard, its members to write (no ``__key__`` yet), its index row."""

    shard: int
    members: dict[str, bytes]
    entry: list


@dataclass(frozen=True)
class EncodeSettings:
    """What the encoders compute and how it is stored (the ``lorafit cache`` options of the same names)."""

    batch_size: int
    text_embeddings: bool
    clip_skip: int
    max_token_length: int | None
    flip_aug: bool
    dtype: str
    max_sequence_length: int | None = None

    def text_options(self):
        from lorafit.families.family import TextOptions

        return TextOptions(
            clip_skip=self.clip_skip,
            max_token_length=self.max_token_length,
            max_sequence_length=self.max_sequence_length,
        )


def encode_samples(
    index: DatasetIndex, spec: BucketSpec, settings: EncodeSettings, base, device: str
) -> Iterator[CachedSample]:
    """Every sample of ``index`` once, in source order, through the VAE (twice with flips) and the text encoders."""
    vae = base.vae.to(device).eval()
    # Text encoders go to the device only to encode captions (Flux's T5 is 9.5 GB in bf16).
    encoders = [encoder.to(device).eval() for encoder in base.text_encoders] if settings.text_embeddings else []
    window: list[tuple[int, int, dict]] = []
    for shard_number, shard in enumerate(index.shards):
        for i, sample in read_indexed(shard, lambda i: True):
            window.append((shard_number, i, sample))
            if len(window) == WINDOW_BATCHES * settings.batch_size:
                yield from _encode_window(index, spec, settings, base, vae, encoders, window, device)
                window = []
    yield from _encode_window(index, spec, settings, base, vae, encoders, window, device)


def _encode_window(index, spec, settings, base, vae, encoders, window, device) -> list[CachedSample]:
    choose = spec.chooser()
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for k, (shard, i, _) in enumerate(window):
        by_bucket.setdefault(choose(index.shards[shard].samples[i]).bucket, []).append(k)
    encoded: list[CachedSample | None] = [None] * len(window)
    for positions in by_bucket.values():
        for start in range(0, len(positions), settings.batch_size):
            batch = positions[start : start + settings.batch_size]
            items = [_decoded(index, choose, *window[k]) for k in batch]
            for k, members_entry in zip(batch, _encode_batch(settings, base, vae, encoders, items, choose, device)):
                encoded[k] = CachedSample(window[k][0], *members_entry)
    return encoded


def _decoded(index: DatasetIndex, choose, shard: int, i: int, sample: dict) -> dict:
    """The sample as the uncached path sees it: centred crop of its bucket, its caption unchanged."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    name = meta.get("source") or f"{PurePosixPath(index.shards[shard].url).name}:{sample['__key__']}"
    transform = SampleTransform(CaptionOps())
    rng = random.Random(0)  # centred crops, no augmentation: nothing is drawn
    pixels, mask, original, crop = transform.pixels_and_mask(sample, choose(index.shards[shard].samples[i]), rng, name)
    return {
        "key": name,
        "is_reg": False,
        "caption": transform.caption(sample, rng, False),
        "pixel_values": pixels,
        "original_size": original,
        "crop_top_left": crop,
        "loss_mask": mask,
        "meta": meta,
    }


@torch.no_grad()
def _encode_batch(settings, base, vae, encoders, items, choose, device) -> list[tuple[dict, list]]:
    from lorafit.families.registry import get_family

    batch = collate(items)
    storage = DTYPES[settings.dtype]
    pixels = batch["pixel_values"].to(device, vae.dtype)
    family = get_family(base.family)
    moments = family.vae_posterior(vae, pixels).parameters
    flipped = family.vae_posterior(vae, pixels.flip(-1)).parameters if settings.flip_aug else None
    if settings.text_embeddings:
        text = family.encode_text(base, batch["captions"], settings.text_options(), device)
    bucket = (pixels.shape[-1], pixels.shape[-2])
    encoded = []
    for j, meta in enumerate(batch["metas"]):
        crop = batch["crop_top_left"][j].tolist()
        original = batch["original_size"][j].tolist()
        members = {"txt": batch["captions"][j].encode("utf-8"), "latent.pth": _tensor_bytes(moments[j], storage)}
        info = {**meta, "original_size": original, "crop_top_left": crop, "bucket": list(bucket)}
        if flipped is not None:
            members["latent_flip.pth"] = _tensor_bytes(flipped[j], storage)
            info["crop_top_left_flip"] = _flipped_crop(original, crop, bucket, choose)
        if settings.text_embeddings:
            for key, tensor in _unpadded(text, j).items():  # the family's conditioning_keys
                members[f"{key}.pth"] = _tensor_bytes(tensor, storage)
        if items[j]["loss_mask"] is not None:  # at the crop's pixels; a flipped draw flips it (pick_cached)
            members[MASK_MEMBER] = _mask_png(items[j]["loss_mask"])
        members["json"] = json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8")
        row = [meta.get("w", original[1]), meta.get("h", original[0]), meta.get("repeats", 1)]
        encoded.append((members, [*row, int(bool(meta.get("is_reg", False))), *bucket]))
    return encoded


def _mask_png(mask: torch.Tensor) -> bytes:
    from PIL import Image

    from lorafit.data.masks import png_bytes

    return png_bytes(Image.fromarray(mask[0].mul(255).round().to(torch.uint8).numpy(), "L"))


def _unpadded(text: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    """Sample ``j``'s conditioning; with a ``prompt_embeds_mask`` (LLM text encoders, whose captions
    vary in length) only its real tokens: the batch's padding is not stored, collate pads again."""
    row = {key: tensor[j] for key, tensor in text.items()}
    if "prompt_embeds_mask" in row:
        length = int(row["prompt_embeds_mask"].sum())
        row["prompt_embeds"] = row["prompt_embeds"][:length]
        row["prompt_embeds_mask"] = row["prompt_embeds_mask"][:length]
    return row


def _tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    buffer = io.BytesIO()
    if tensor.is_floating_point():  # masks keep their bool dtype
        tensor = tensor.to(dtype=dtype)
    torch.save(tensor.detach().to("cpu").contiguous().clone(), buffer)
    return buffer.getvalue()


def _flipped_crop(original_size, crop_top_left, bucket, choose) -> list[int]:
    """``crop_top_left`` of the mirrored crop: the left offset is then measured from the right edge."""
    height, width = original_size
    resized_w = choose((width, height)).resized_size[0]
    top, left = crop_top_left
    return [top, resized_w - left - bucket[0]]
