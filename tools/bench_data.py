"""Data pipeline throughput: lorafit's streaming DataModule vs. raw PIL decode+resize, per CPU core.

    python tools/bench_data.py [--images 48] [--out benchmarks/data.md]

1. Writes ``--images`` photo-like JPEGs of 1024-1600 px (mixed aspect ratios) and prepares them
   into shards (`lorafit prepare`), as a user's dataset would be.
2. Baseline: the same files decoded with PIL, resized to the bucket's cover size (Lanczos) and
   cropped, in one process: what any trainer must at least do per image.
3. lorafit: one epoch of ``LoraDataModule`` (resolution 1024, SDXL buckets, batch 4,
   ``num_workers=0``, so one core) over the shards: tar streaming, bucketing, decode (with JPEG
   draft decoding), resize, crop, tensor conversion and collation.
4. Cached latents: shards holding SDXL-sized latent moments (8x128x128, fp16, as
   ``lorafit cache --dtype float16`` writes them), streamed as batches of 4.

Every figure is per core (one process); DataLoader workers scale it with the cores available.
The target of the data issue is lorafit >= 0.8x the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorafit.data.buckets import make_bucket_table, select_bucket
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.data.resize_crop import plan_resize_crop

RESOLUTION, MAX_BUCKET, BATCH = 1024, 2048, 4


def write_photos(folder: Path, count: int) -> list[Path]:
    """Smooth random 'photos' (JPEG q92) of 1024-1600 px sides; noise would compress unrealistically badly."""
    rng = np.random.default_rng(0)
    sizes = [(1600, 1200), (1200, 1600), (1536, 1024), (1024, 1536), (1280, 1280), (1920, 1080)]
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        base = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
        photo = base.resize((width, height), Image.Resampling.BICUBIC)
        path = folder / "10_ohwx dog" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, "JPEG", quality=92)
        path.with_suffix(".txt").write_text("ohwx dog, a photo")
        paths.append(path)
    return paths


def raw_decode_resize(paths: list[Path], rounds: int) -> float:
    table = make_bucket_table(RESOLUTION, 256, MAX_BUCKET, 64)
    start = time.perf_counter()
    for _ in range(rounds):
        for path in paths:
            with Image.open(path) as img:
                img = img.convert("RGB")
            choice = select_bucket(img.width, img.height, table=table)
            plan = plan_resize_crop(img.width, img.height, *choice.bucket, resized_size=choice.resized_size)
            img = img.resize(plan.resized_size, Image.Resampling.LANCZOS).crop(plan.crop_box)
            torch.from_numpy(np.asarray(img).copy())
    return rounds * len(paths) / (time.perf_counter() - start)


def pipeline_epoch(shards: Path, rounds: int, **kwargs) -> tuple[float, float]:
    dm = LoraDataModule(
        shards=str(shards),
        resolution=RESOLUTION,
        max_bucket_reso=MAX_BUCKET,
        batch_size=BATCH,
        repeats=1,
        shuffle_buffer=64,
        **kwargs,
    )
    dm.prepare_data()
    dm.setup("fit")
    images = batches = 0
    start = time.perf_counter()
    for epoch in range(rounds):
        loader = dm.train_dataloader()
        loader.position = lambda epoch=epoch: (epoch, 0)
        for batch in loader:
            images += len(batch["keys"])
            batches += 1
    elapsed = time.perf_counter() - start
    return images / elapsed, batches / elapsed


def write_cached(folder: Path, count: int) -> None:
    """Shards shaped like `lorafit cache` output for SDXL at 1024x1024 (fp16 moments)."""
    import webdataset as wds

    from lorafit.data.sample_transform import BucketSpec

    folder.mkdir(parents=True)
    spec = BucketSpec(RESOLUTION, 256, MAX_BUCKET, 64)
    rows = []
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i in range(count):
            buffer = io.BytesIO()
            torch.save(torch.randn(8, 128, 128).half(), buffer)
            meta = {
                "w": 1024,
                "h": 1024,
                "repeats": 1,
                "is_reg": False,
                "original_size": [1024, 1024],
                "crop_top_left": [0, 0],
            }
            sink.write(
                {
                    "__key__": f"{i:08d}",
                    "latent.pth": buffer.getvalue(),
                    "txt": b"ohwx dog",
                    "json": json.dumps(meta).encode(),
                }
            )
            rows.append([1024, 1024, 1, 0, 1024, 1024])
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": "train-000000.tar", "samples": rows}]}))
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "shards": [{"name": "train-000000.tar", "samples": count}],
                "cached": {
                    "resolution": RESOLUTION,
                    "bucket_spec": repr(spec),
                    "flip_aug": False,
                    "text_embeddings": False,
                    "family": "sdxl",
                    "model": "bench",
                },
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/data.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_photos(root / "photos", args.images)
        prepare(str(root / "photos"), out=str(root / "shards"), resolution=RESOLUTION, max_bucket_reso=MAX_BUCKET)
        raw_decode_resize(paths[:4], 1)  # warm-up
        raw = raw_decode_resize(paths, args.rounds)
        ours, _ = pipeline_epoch(root / "shards", args.rounds, cache_dir=str(root / "cache"))
        write_cached(root / "cached", args.images * 4)
        _, cached_batches = pipeline_epoch(root / "cached", args.rounds, cache_dir=str(root / "cache"))
    rows = [
        ("raw PIL decode + Lanczos resize + crop (1 core)", f"{raw:.1f} images/s"),
        ("lorafit LoraDataModule epoch (1 core, batch 4)", f"{ours:.1f} images/s"),
        ("ratio lorafit / raw (target >= 0.8)", f"{ours / raw:.2f}x"),
        ("cached SDXL latents (fp16 8x128x128), batches of 4 (1 core)", f"{cached_batches:.1f} batches/s"),
    ]
    header = (
        f"## {datetime.date.today()} - {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, Pillow {Image.__version__}\n\n"
        f"`python tools/bench_data.py --images {args.images} --rounds {args.rounds}`: {args.images} JPEGs "
        f"of 1024-1920 px, resolution {RESOLUTION}, max_bucket_reso {MAX_BUCKET}.\n\n"
        "| measure | result |\n|---|---|\n"
    )
    text = header + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() if out.exists() else "# Data pipeline throughput\n\nNewest first.\n"
    title, _, rest = previous.partition("Newest first.\n")
    out.write_text(f"{title}Newest first.\n\n{text}{rest}")


if __name__ == "__main__":
    main()
