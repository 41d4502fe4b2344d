"""``lorafit cache``: encode prepared shards once into VAE latents (and text embeddings) shards.

Encoding every image through the VAE at every step is most of a LoRA step's cost at SDXL sizes,
and the result is the same each epoch when crops are fixed: kohya's ``cache_latents``. The cache
stores the VAE posterior's *moments* (mean and log-variance), not one sample of it, so training
still draws fresh latent noise each step, and draws exactly what the uncached path would draw
with the same generator: cached and uncached training give the same loss (tested).

Output: one ``train-NNNNNN.tar`` per source shard, holding its samples in its order, so the shard
index and therefore every epoch plan are the source's: training on the cache plays the samples
in the order (and with the flips and captions) training on the source images does. Each sample
has ``<key>.latent.pth`` (+ ``latent_flip.pth`` with ``--flip_aug``:
the mirrored image's moments), ``<key>.prompt_embeds.pth`` (+ pooled for SDXL) with
``--text_embeddings`` (77 token positions, or 1 + 75n + 1 with ``--max_token_length``: kohya's
long captions in n chunks), the caption and JSON, plus ``index.json`` and ``dataset.json`` whose
``cached`` section records what the cache fixes: bucket settings, which the DataModule checks
against its own, and model family, clip_skip and max_token_length, which the model checks at fit
start (LoraDiffusionModule.check_cache).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from lorafit.data.cache_encode import CachedSample, EncodeSettings, encode_samples
from lorafit.data.sample_transform import BucketSpec
from lorafit.data.shard_index import DatasetIndex, is_local, load_index
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")


@dataclass(frozen=True)
class CachePlan:
    """What one ``lorafit cache`` run reads, encodes and writes; settled before the model loads."""

    index: DatasetIndex
    spec: BucketSpec
    out_dir: Path
    encode: EncodeSettings

    def settings(self, model: str, base) -> dict:
        """The ``cached`` section of dataset.json: what the DataModule and the model check at fit start."""
        from lorafit.families.registry import get_family

        encode = self.encode
        family = get_family(base.family)
        sequence = getattr(family, "sequence_length", None)  # T5 families: the cached T5 length
        return {
            "model": model,
            "resolution": self.spec.resolution,
            "bucket_spec": repr(self.spec),
            "flip_aug": encode.flip_aug,
            "text_embeddings": encode.text_embeddings,
            "clip_skip": encode.clip_skip,
            "max_token_length": encode.max_token_length,
            "max_sequence_length": sequence(base, encode.text_options()) if sequence else None,
            "dtype": encode.dtype,
            "family": base.family,
        }


def cache(
    src: str | list[str],
    *,
    out: str,
    model: str,
    single_file_config: str | None = None,
    text_embeddings: bool = False,
    clip_skip: int = 1,
    max_token_length: int | None = None,
    max_sequence_length: int | None = None,
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
    max_samples_per_shard: int | None = None,
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
        clip_skip: SD1/SD2 text-encoder layer, as in the training config (model.conditioning.clip_skip).
        max_token_length: kohya's ``max_token_length`` for --text_embeddings, as in the training
            config (model.conditioning.max_token_length): caption tokens read (150 or 225) in 75-token chunks
            whose hidden states are joined (1 + 75n + 1 positions). Empty: 75, longer captions cut.
        max_sequence_length: Flux: T5 tokens per caption for --text_embeddings, as in the training
            config (model.conditioning.max_sequence_length); empty = 512 ([dev]) / 256 ([schnell]).
            Qwen-Image / Z-Image / FLUX.2 [klein]: the LLM's caption budget (1024 / 512 / 512).
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
        max_samples_per_shard: Ignored (old command lines): each cached shard mirrors a source shard.
        overwrite: Replace a non-empty output folder.

    Returns:
        The summary written to dataset.json.
    """
    if max_samples_per_shard is not None:
        logger.warning(
            "--max_samples_per_shard is ignored: cached shards mirror the source shards, so that training "
            "on the cache plays the samples in the order training on the images does"
        )
    spec = BucketSpec(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale, enable_bucket)
    encode = EncodeSettings(
        batch_size, text_embeddings, clip_skip, max_token_length, flip_aug, dtype, max_sequence_length
    )
    plan = plan_cache(src, out, spec, encode, overwrite)
    from lorafit.families.loading import load_base_model

    base = load_base_model(model, single_file_config=single_file_config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    samples = encode_samples(plan.index, plan.spec, plan.encode, base, device)
    summary = write_cache(plan, samples, plan.settings(model, base))
    logger.info("cached %d samples into %s", summary["samples_written"], plan.out_dir)
    return summary


def plan_cache(src: str | list[str], out: str, spec: BucketSpec, encode: EncodeSettings, overwrite: bool) -> CachePlan:
    """Check the options and the output folder and index the source: every refusal comes before the
    model loads, and a folder to overwrite is kept until the encoded samples are being written."""
    if encode.max_token_length is not None and encode.max_token_length < 1:
        raise LorafitError(f"--max_token_length: {encode.max_token_length}; use 150 or 225, or leave it empty for 75")
    if encode.max_token_length and not encode.text_embeddings:
        logger.warning(
            "--max_token_length only changes cached text embeddings; without --text_embeddings true "
            "it has no effect (training encodes captions with model.max_token_length)"
        )
    if encode.batch_size < 1:
        raise LorafitError(f"--batch_size: {encode.batch_size}; use 1 or more")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise LorafitError(f"output folder {out_dir} is not empty; choose a new one or pass --overwrite true")
    index = load_index(src, "SRC")
    inside = [
        s.url for s in index.shards if is_local(s.url) and Path(s.url).resolve().is_relative_to(out_dir.resolve())
    ]
    if inside:
        raise LorafitError(f"--out {out_dir} holds the source shard {inside[0]}; write the cache to another folder")
    return CachePlan(index, spec, out_dir, encode)


def write_cache(plan: CachePlan, samples: Iterable[CachedSample], cached: dict) -> dict:
    """Write the encoded samples (in source order) as one shard per source shard, then index.json and
    dataset.json (whose ``cached`` section is ``cached``); returns the summary written to dataset.json."""
    import webdataset as wds

    shutil.rmtree(plan.out_dir, ignore_errors=True)  # plan_cache refused a non-empty one without --overwrite
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"train-{s:06d}.tar" for s in range(len(plan.index.shards))]
    entries: dict[str, list] = {name: [] for name in names}
    samples = iter(samples)
    pending, written = next(samples, None), 0
    with tqdm(total=plan.index.num_samples, desc="lorafit cache", unit="img") as bar:
        for shard, name in enumerate(names):  # every source shard, the empty ones too: the index keeps them
            with wds.TarWriter(str(plan.out_dir / name), encoder=False, mtime=0.0) as writer:
                while pending is not None and pending.shard == shard:
                    writer.write({"__key__": f"{written:08d}", **pending.members})
                    entries[name].append(pending.entry)
                    written += 1
                    bar.update(1)
                    pending = next(samples, None)
    return _write_report(plan, entries, written, cached)


def _write_report(plan: CachePlan, entries: dict[str, list], written: int, cached: dict) -> dict:
    shards = list(entries.items())
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
