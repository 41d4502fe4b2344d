"""Which shards to stream, and a small index of every sample in them (size, repeats, is_reg).

The training pipeline streams shards, but an epoch that is equal on every DDP rank, disjoint
across ranks and exact about repeats must be *planned* before a byte is read: how many samples
of which bucket each worker will see decides how many batches it yields. The index holds just
enough for that plan, ``[w, h, repeats, is_reg]`` per sample in shard order (plus the bucket
``[bw, bh]`` for cached latents, whose size was fixed at cache time).

``lorafit prepare`` and ``lorafit cache`` write the index as ``index.json`` next to the shards.
Shards from elsewhere (a brace pattern, ``pipe:``/http URLs) are indexed once by reading their
members' JSON (or image headers) and the index is cached under ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

INDEX_NAME = "index.json"
SUMMARY_NAME = "dataset.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardIndex:
    """One shard: where it is and its samples as ``(w, h, repeats, is_reg[, bw, bh])`` tuples."""

    url: str
    samples: list[tuple]


@dataclass(frozen=True)
class DatasetIndex:
    """Every shard of a dataset in a fixed order, and the summary when one was written."""

    shards: list[ShardIndex]
    summary: dict | None = None

    @property
    def num_samples(self) -> int:
        return sum(len(shard.samples) for shard in self.shards)

    @property
    def cached(self) -> dict | None:
        """The ``cached`` section of a ``lorafit cache`` output (latent settings), else None."""
        return (self.summary or {}).get("cached")


def expand_sources(sources: str | list[str], key: str) -> list[str]:
    """Shard URLs from a prepared folder, a brace pattern, paths or URLs (``pipe:``, http)."""
    from webdataset.shardlists import expand_urls

    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise LorafitError(f"{key} is empty; give a folder written by `lorafit prepare`, or shard paths/URLs")
    urls: list[str] = []
    for item in items:
        item = str(item)
        path = Path(item).expanduser()
        if path.is_dir():
            urls += _prepared_urls(path, key)
        else:
            urls += [os.path.expanduser(u) for u in expand_urls(item)]
    for url in urls:
        if is_local(url) and not Path(url).is_file():
            raise LorafitError(f"{key}: shard {url} does not exist; check the path or brace pattern")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _prepared_urls(folder: Path, key: str) -> list[str]:
    summary_path = folder / SUMMARY_NAME
    if not summary_path.is_file():
        raise LorafitError(
            f"{key}: {folder} has no {SUMMARY_NAME}; it is not a finished `lorafit prepare` output "
            "(run prepare again, or give shard paths/a brace pattern)"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return [str(folder / shard["name"]) for shard in summary["shards"]]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _from_written_index(urls: list[str]) -> DatasetIndex | None:
    """The index.json that ``prepare``/``cache`` wrote, when every shard is covered by one."""
    folders = {Path(url).parent for url in urls if is_local(url)}
    if len(folders) != 1 or not all(is_local(u) for u in urls):
        return None
    folder = folders.pop()
    index = _read_json(folder / INDEX_NAME)
    if index is None:
        return None
    by_name = {shard["name"]: [tuple(s) for s in shard["samples"]] for shard in index["shards"]}
    if not all(Path(url).name in by_name for url in urls):
        return None
    return DatasetIndex(
        [ShardIndex(url, by_name[Path(url).name]) for url in urls], summary=_read_json(folder / SUMMARY_NAME)
    )


def _sample_entry(sample: dict, url: str) -> tuple:
    """Index entry of one raw shard sample: sizes from its JSON, else from the image header."""
    from PIL import Image

    meta = json.loads(sample["json"]) if "json" in sample else {}
    width, height = meta.get("w"), meta.get("h")
    if width is None or height is None:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise LorafitError(f"shard {url}: sample {sample['__key__']} has no image (jpg, png, webp)")
        with Image.open(io.BytesIO(sample[ext])) as img:  # reads the header only
            width, height = img.size
    return (int(width), int(height), int(meta.get("repeats", 1)), int(bool(meta.get("is_reg", False))))


def scan_shard(url: str) -> ShardIndex:
    """Reads one shard's members to index it (used for shards not written by lorafit)."""
    from webdataset.tariterators import tarfile_samples

    try:
        samples = [_sample_entry(s, url) for s in tarfile_samples([{"url": url}])]
    except (OSError, ValueError) as err:
        raise LorafitError(f"cannot read shard {url} ({err}); check the path/URL") from None
    return ShardIndex(url, samples)


def _cache_key(urls: list[str]) -> str:
    digest = hashlib.sha1()
    for url in urls:
        digest.update(url.encode())
        if is_local(url):
            stat = os.stat(url)
            digest.update(f":{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def build_index(urls: list[str], cache_dir: str | None = None) -> DatasetIndex:
    """The index of ``urls``: the written one, a cached scan, or a new scan (then cached)."""
    written = _from_written_index(urls)
    if written is not None:
        return written
    cache_file = Path(cache_dir or default_cache_dir()) / "index" / f"{_cache_key(urls)}.json"
    cached = _read_json(cache_file)
    if cached is not None:
        return DatasetIndex([ShardIndex(s["url"], [tuple(x) for x in s["samples"]]) for s in cached["shards"]])
    logger.info("indexing %d shards (once; cached in %s)", len(urls), cache_file)
    index = DatasetIndex([scan_shard(url) for url in urls])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shards": [{"url": s.url, "samples": s.samples} for s in index.shards]}))
    os.replace(tmp, cache_file)
    return index


def load_index(sources: str | list[str], key: str, cache_dir: str | None = None, scan: bool = True) -> DatasetIndex:
    """Expand ``sources`` and index them; with ``scan=False`` only a written or cached index is used.

    Raises:
        LorafitError: a missing shard, or (``scan=False``) shards that were never indexed.
    """
    urls = expand_sources(sources, key)
    if not scan:
        index = _from_written_index(urls)
        cache_file = Path(cache_dir or default_cache_dir()) / "index" / f"{_cache_key(urls)}.json"
        if index is None and not cache_file.is_file():
            raise LorafitError(f"{key}: shards are not indexed yet; the DataModule's prepare_data indexes them")
    return build_index(urls, cache_dir)
