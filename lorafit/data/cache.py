"""``lorafit cache``: encode prepared shards once into VAE latents (and text embeddings) shards.

Encoding every image through the VAE at every step is most of a LoRA step's cost at SDXL sizes,
and the result is the same each epoch when crops are fixed: kohya's ``cache_latents``. The cache
stores the VAE posterior's *moments* (mean and log-variance), not one sample of it, so training
still draws fresh latent noise each step, and draws exactly what the uncached path would draw
with the same generator: cached and uncached training give the same loss (tested).

Output: ``train-NNNNNN.tar`` with ``<key>.latent.pth`` (+ ``latent_flip.pth`` with ``--flip_aug``:
the mirrored image's moments), ``<key>.prompt_embeds.pth`` (+ pooled for SDXL) with
``--text_embeddings`` (77 token positions, or 1 + 75n + 1 with ``--max_token_length``: kohya's
long captions in n chunks), the caption and JSON, plus ``index.json`` and ``dataset.json`` whose
``cached`` section records what the cache fixes: bucket settings, which the DataModule checks
against its own, and model family, clip_skip and max_token_length, which the model checks at fit
start (LoraDiffusionModule.check_cache).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lorafit.data.captions import CaptionOps
from lorafit.data.epoch_plan import plan_epoch
from lorafit.data.sample_transform import BucketSpec, SampleTransform
from lorafit.data.shard_index import DatasetIndex, is_local, load_index
from lorafit.data.stream import ShardStream
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CachePlan:
    """What one ``lorafit cache`` run reads, encodes and writes; settled before the model loads."""

    index: DatasetIndex
    spec: BucketSpec
    out_dir: Path
    total: int  # samples to encode
    batch_size: int
    max_samples_per_shard: int
    text_embeddings: bool
    clip_skip: int
    max_token_length: int | None
    flip_aug: bool
    dtype: str

    def settings(self, model: str, family: str) -> dict:
        """The ``cached`` section of dataset.json: what the DataModule and the model check at fit start."""
        return {
            "model": model,
            "resolution": self.spec.resolution,
            "bucket_spec": repr(self.spec),
            "flip_aug": self.flip_aug,
            "text_embeddings": self.text_embeddings,
            "clip_skip": self.clip_skip,
            "max_token_length": self.max_token_length,
            "dtype": self.dtype,
            "family": family,
        }


@dataclass
class CachedSample:
    """One encoded sample: its shard members (no ``__key__`` yet) and its index row."""

    members: dict[str, bytes]
    entry: list


def _tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu", dtype).contiguous().clone(), buffer)
    return buffer.getvalue()


def _flipped_crop(original_size, crop_top_left, bucket, choose) -> list[int]:
    """``crop_top_left`` of the mirrored crop: the left offset is then measured from the right edge."""
    height, width = original_size
    resized_w = choose((width, height)).resized_size[0]
    top, left = crop_top_left
    return [top, resized_w - left - bucket[0]]


def cache(
    src: str | list[str],
    *,
    out: str,
    model: str,
    single_file_config: str | None = None,
    text_embeddings: bool = False,
    clip_skip: int = 1,
    max_token_length: int | None = None,
    flip_aug: bool = False,
    resolution: int = 512,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
    enable_bucket: bool = True,
    batch_size: int = 4,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    device: str | None = None,
    max_samples_per_shard: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Encode prepared shards into latent (and text-embedding) shards that training streams instead.

    Use the same bucket settings as the training config's data section (the DataModule refuses
    cached shards made for other settings). Random crops and colour augmentation cannot be cached;
    flips can (``--flip_aug true`` stores both orientations).

    Args:
        src: A `lorafit prepare` output folder, or shard paths / a brace pattern / URLs.
        out: Output folder for the cached shards, index.json and dataset.json.
        model: The base model training will use (its VAE, and text encoders for --text_embeddings).
        single_file_config: For a single-file model: a diffusers directory of the same architecture.
        text_embeddings: Also cache text-encoder outputs (only for training with frozen text
            encoders and captions that do not change per step).
        clip_skip: SD1/SD2 text-encoder layer, as in the training config (model.clip_skip).
        max_token_length: kohya's ``max_token_length`` for --text_embeddings, as in the training
            config (model.max_token_length): caption tokens read (150 or 225) in 75-token chunks
            whose hidden states are joined (1 + 75n + 1 positions). Empty: 75, longer captions cut.
        flip_aug: Also cache the horizontally mirrored image, for data.flip_aug.
        resolution: data.resolution of the training config.
        min_bucket_reso: data.min_bucket_reso.
        max_bucket_reso: data.max_bucket_reso.
        bucket_reso_steps: data.bucket_reso_steps.
        bucket_no_upscale: data.bucket_no_upscale.
        enable_bucket: data.enable_bucket.
        batch_size: Images per VAE call (memory vs speed; results do not depend on it).
        dtype: Storage dtype of the cached tensors (float32 = training sees exactly uncached values).
        device: Device for the encoders (default: cuda when available, else cpu).
        max_samples_per_shard: Start a new output shard after this many samples.
        overwrite: Replace a non-empty output folder.

    Returns:
        The summary written to dataset.json.
    """
    plan = plan_cache(
        src,
        out,
        text_embeddings=text_embeddings,
        clip_skip=clip_skip,
        max_token_length=max_token_length,
        flip_aug=flip_aug,
        spec=BucketSpec(
            resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale, enable_bucket
        ),
        batch_size=batch_size,
        dtype=dtype,
        max_samples_per_shard=max_samples_per_shard,
        overwrite=overwrite,
    )
    from lorafit.families.loading import load_base_model

    base = load_base_model(model, single_file_config=single_file_config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = write_cache(plan, encode_samples(plan, base, device), plan.settings(model, base.family))
    logger.info("cached %d samples into %s", summary["samples_written"], plan.out_dir)
    return summary


def plan_cache(
    src: str | list[str],
    out: str,
    *,
    text_embeddings: bool,
    clip_skip: int,
    max_token_length: int | None,
    flip_aug: bool,
    spec: BucketSpec,
    batch_size: int,
    dtype: str,
    max_samples_per_shard: int,
    overwrite: bool,
) -> CachePlan:
    """Check the options and the output folder and index the source: every refusal comes before the
    model loads, and a folder to overwrite is kept until the encoded samples are being written."""
    if max_token_length is not None and max_token_length < 1:
        raise LorafitError(f"--max_token_length: {max_token_length}; use 150 or 225, or leave it empty for 75")
    if max_token_length and not text_embeddings:
        logger.warning(
            "--max_token_length only changes cached text embeddings; without --text_embeddings true "
            "it has no effect (training encodes captions with model.max_token_length)"
        )
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise LorafitError(f"output folder {out_dir} is not empty; choose a new one or pass --overwrite true")
    index = load_index(src, "SRC")
    inside = [
        s.url for s in index.shards if is_local(s.url) and Path(s.url).resolve().is_relative_to(out_dir.resolve())
    ]
    if inside:
        raise LorafitError(f"--out {out_dir} holds the source shard {inside[0]}; write the cache to another folder")
    eval_plan = plan_epoch(
        index, spec.chooser(), seed=0, epoch=0, world_size=1, workers=0, batch_size=batch_size, repeats=False
    )
    return CachePlan(
        index,
        spec,
        out_dir,
        sum(map(sum, eval_plan.copies)),
        batch_size,
        max_samples_per_shard,
        text_embeddings,
        clip_skip,
        max_token_length,
        flip_aug,
        dtype,
    )


def encode_samples(plan: CachePlan, base, device: str) -> Iterator[CachedSample]:
    """Every source sample once, through the VAE (twice with flips) and the text encoders."""
    stream = ShardStream(
        plan.index,
        plan.spec,
        SampleTransform(CaptionOps()),
        batch_size=plan.batch_size,
        seed=0,
        reg_ratio=1.0,
        shuffle_buffer=0,
        training=False,
        num_workers=0,
        keep_meta=True,
    )
    vae = base.vae.to(device).eval()
    encoders = [encoder.to(device).eval() for encoder in base.text_encoders]
    for batch in stream:
        yield from _encode_batch(plan, base, vae, encoders, batch, device)


@torch.no_grad()
def _encode_batch(plan: CachePlan, base, vae, encoders: list, batch: dict, device: str) -> list[CachedSample]:
    from lorafit.families.clip_text import encode_tokens, tokenize

    storage = DTYPES[plan.dtype]
    pixels = batch["pixel_values"].to(device, vae.dtype)
    moments = vae.encode(pixels).latent_dist.parameters
    flipped = vae.encode(pixels.flip(-1)).latent_dist.parameters if plan.flip_aug else None
    if plan.text_embeddings:
        ids = tokenize(base.tokenizers, batch["captions"], device, plan.max_token_length)
        text = encode_tokens(base.family, encoders, ids, plan.clip_skip)
    bucket = (pixels.shape[-1], pixels.shape[-2])
    encoded = []
    for j, meta in enumerate(batch["metas"]):
        crop = batch["crop_top_left"][j].tolist()
        original = batch["original_size"][j].tolist()
        members = {"txt": batch["captions"][j].encode("utf-8"), "latent.pth": _tensor_bytes(moments[j], storage)}
        info = {**meta, "original_size": original, "crop_top_left": crop, "bucket": list(bucket)}
        if flipped is not None:
            members["latent_flip.pth"] = _tensor_bytes(flipped[j], storage)
            info["crop_top_left_flip"] = _flipped_crop(original, crop, bucket, plan.spec.chooser())
        if plan.text_embeddings:
            members["prompt_embeds.pth"] = _tensor_bytes(text.hidden_states[j], storage)
            if text.pooled is not None:
                members["pooled_prompt_embeds.pth"] = _tensor_bytes(text.pooled[j], storage)
        members["json"] = json.dumps(info, ensure_ascii=False, sort_keys=True).encode("utf-8")
        row = [meta.get("w", original[1]), meta.get("h", original[0]), meta.get("repeats", 1)]
        encoded.append(CachedSample(members, [*row, int(bool(meta.get("is_reg", False))), *bucket]))
    return encoded


def write_cache(plan: CachePlan, samples: Iterable[CachedSample], cached: dict) -> dict:
    """Write the encoded samples as shards, then index.json and dataset.json (whose ``cached``
    section is ``cached``); returns the summary written to dataset.json."""
    import webdataset as wds

    shutil.rmtree(plan.out_dir, ignore_errors=True)  # plan_cache refused a non-empty one without --overwrite
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list] = {}
    written = 0
    with (
        tqdm(total=plan.total, desc="lorafit cache", unit="img") as bar,
        wds.ShardWriter(
            str(plan.out_dir / "train-%06d.tar"),
            maxcount=plan.max_samples_per_shard,
            verbose=0,
            encoder=False,
            mtime=0.0,
        ) as writer,
    ):
        for sample in samples:
            writer.write({"__key__": f"{written:08d}", **sample.members})
            entries.setdefault(os.path.basename(writer.fname), []).append(sample.entry)
            written += 1
            bar.update(1)
    return _write_report(plan, entries, written, cached)


def _write_report(plan: CachePlan, entries: dict[str, list], written: int, cached: dict) -> dict:
    shards = sorted(entries.items())
    source_summary = dict(plan.index.summary or {})
    kept = ("instance_samples", "reg_samples", "ss_tag_frequency", "images_in", "folders")
    summary = {
        **{key: value for key, value in source_summary.items() if key in kept},
        "samples_written": written,
        "shards": [{"name": name, "samples": len(rows)} for name, rows in shards],
        "cached": cached,
    }
    index = {"format": "lorafit-index", "version": 1, "shards": [{"name": n, "samples": rows} for n, rows in shards]}
    (plan.out_dir / "index.json").write_text(json.dumps(index))
    (plan.out_dir / "dataset.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
