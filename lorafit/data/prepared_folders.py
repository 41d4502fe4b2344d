"""``data.train_dir``/``val_dir``: a kohya folder tree prepared once into the cache, reused until a file
under it changes (the cache folder's name holds a fingerprint of every file's name, size and mtime,
and of the settings that change what prepare writes)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from lorafit.data.kohya_folders import IMAGE_EXTENSIONS

logger = logging.getLogger("lorafit.data")


def tree_fingerprint(roots: list[Path]) -> str:
    """Changes whenever a file under ``roots`` is added, removed, renamed or modified."""
    digest = hashlib.sha1()
    for root in roots:
        digest.update(str(root.resolve()).encode())
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(filenames):
                stat = os.stat(os.path.join(dirpath, name))
                digest.update(f"{os.path.relpath(dirpath, root)}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def has_image(root: Path) -> bool:
    return any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for _, _, names in os.walk(root) for name in names)


def prepared_dir(cache_dir: Path, folder: str, reg: str | list[str] | None, settings: str, alpha_mask: bool) -> Path:
    """Where ``folder`` (with its regularization folders ``reg``) is prepared under ``cache_dir``;
    ``settings``: the other settings the shards depend on, as text."""
    roots = [Path(folder).expanduser()] + [Path(r).expanduser() for r in ([reg] if isinstance(reg, str) else reg or [])]
    masks = ":alpha_mask" if alpha_mask else ""
    key = hashlib.sha1(f"{tree_fingerprint(roots)}:{settings}{masks}".encode()).hexdigest()[:16]
    return cache_dir / "prepared" / f"{roots[0].resolve().name}-{key}"


def prepare_folder(out: Path, folder: str, reg, hp: Any) -> Path:
    """``folder`` prepared into ``out`` unless it already is; ``hp``: the data module's settings."""
    from lorafit.data.prepare_write import prepare_staged

    if (out / "dataset.json").is_file():
        return out
    logger.info("preparing %s into %s (once; reused until a file changes)", folder, out)
    # Without buckets every image becomes one square: the bucket range must not stop prepare
    # (a 32 px run would fail the default min_bucket_reso of 256).
    bucket_range = (
        (hp.min_bucket_reso, hp.max_bucket_reso, hp.bucket_reso_steps)
        if hp.enable_bucket
        else (hp.resolution, hp.resolution, 8)
    )
    # Staged: complete or absent (a crash mid-prepare is redone, not half-used), nothing left on failure.
    prepare_staged(
        folder,
        out,
        reg_dir=reg,
        caption_ext=hp.caption_ext,
        resolution=hp.resolution,
        min_bucket_reso=bucket_range[0],
        max_bucket_reso=bucket_range[1],
        bucket_reso_steps=bucket_range[2],
        bucket_no_upscale=hp.bucket_no_upscale and hp.enable_bucket,
        alpha_mask=hp.alpha_mask,
    )
    return out
