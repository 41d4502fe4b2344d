"""``lorafit prepare``: kohya-style image folders -> webdataset shards, a summary and a report.

Run once per dataset; training then always streams shards. The output folder holds::

    train-000000.tar ...   samples: <key>.jpg|png|webp (image), <key>.txt (caption), <key>.json
    report.md              what was written, skipped (with why) and fixed, per folder/bucket/tag
    index.json             per shard, each sample's [w, h, repeats, is_reg] in shard order: lets
                           the training DataModule plan equal, disjoint epochs for every DDP rank
                           without opening a shard (lorafit.data.shard_index)
    dataset.json           summary, written last: a folder without it is an unfinished run

A sample with a loss mask (a ``<stem>_mask.png`` beside its image, or with ``--alpha_mask`` its
alpha channel; :mod:`lorafit.data.masks`) also has ``<key>.mask.png``.

Per-sample ``<key>.json`` fields: ``w``/``h`` (size after EXIF orientation), ``repeats``,
``subject``, ``class``, ``is_reg``, ``folder``, ``folder_prompt``, ``caption_source``
(``sidecar``/``folder``), ``source`` (absolute path), ``relpath``, ``sha1`` (of the source file),
``source_format``, ``stored`` (``original``/``jpeg``/``png``), ``fixes``, ``small``, ``bucket`` and
``bucket_resized`` (``[w, h]`` under the prepare settings), ``aspect_error`` and ``mask``
(``file``, ``alpha`` or null).

Nothing is ever written into a source folder: files are only opened for reading, and an output
folder inside a source folder is refused. Which bytes are stored (original or re-encoded, and
why JPEG or PNG) is explained in :mod:`lorafit.data.prepare_sample`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from PIL import ImageColor
from tqdm import tqdm

from lorafit.data.buckets import make_bucket_table
from lorafit.data.kohya_folders import ImageRecord, TreeScan, scan_tree
from lorafit.data.masks import MEMBER as MASK_MEMBER
from lorafit.data.prepare_report import PrepareTally, render_report
from lorafit.data.prepare_sample import SampleSettings, SkipFile, prepare_file
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

SHARD_PATTERN = "train-%06d.tar"
SUMMARY_NAME = "dataset.json"
INDEX_NAME = "index.json"
REPORT_NAME = "report.md"


def _roots(paths: str | os.PathLike | list | None, flag: str) -> list[Path]:
    if paths is None:
        return []
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    roots = [Path(p).expanduser() for p in items]
    for root in roots:
        if not root.is_dir():
            state = "is a file" if root.exists() else "does not exist"
            raise LorafitError(
                f"{flag} folder {root} {state}; point {flag} at a folder of images or of 'N_<trigger> <class>' folders"
            )
    return roots


def _check_layout(src: list[Path], reg: list[Path], out: Path) -> None:
    """Refuses overlapping inputs (images read twice) and an output inside an input."""
    named = [("SRC", r) for r in src] + [("--reg", r) for r in reg]
    resolved = [(flag, root, root.resolve()) for flag, root in named]
    for i, (flag_a, a, real_a) in enumerate(resolved):
        for flag_b, b, real_b in resolved[i + 1 :]:
            if real_a == real_b or real_a in real_b.parents or real_b in real_a.parents:
                raise LorafitError(
                    f"{flag_a} {a} and {flag_b} {b} overlap, so their images would be read "
                    "twice; give folders that do not contain each other"
                )
    real_out = out.resolve()
    for flag, root, real in resolved:
        if real_out == real or real in real_out.parents:
            raise LorafitError(
                f"--out {out} is inside {flag} folder {root}; prepare never writes into a "
                "source folder - choose an output folder outside it"
            )


def _clear_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--out {out} is a file; give a folder for the shards")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LorafitError(
                f"output folder {out} is not empty; choose a new folder or pass "
                "--overwrite true to replace the prepared dataset in it"
            )
        # The summary goes first: from this moment the folder no longer claims a finished dataset.
        names = (SUMMARY_NAME, REPORT_NAME, INDEX_NAME)
        ours = [out / name for name in names] + sorted(out.glob("train-*.tar"))
        ours += [_tmp_name(out / name) for name in names]  # from a crashed run
        for path in ours:
            if path.is_file():
                path.unlink()
        left = sorted(p.name for p in out.iterdir())
        if left:
            logger.warning(
                "--overwrite: left %d other entries in %s untouched (%s)",
                len(left),
                out,
                ", ".join(left[:3]) + (", ..." if len(left) > 3 else ""),
            )
    out.mkdir(parents=True, exist_ok=True)


def _background(alpha_background: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(alpha_background)[:3]
    except ValueError:
        raise LorafitError(
            f"alpha_background {alpha_background!r} is not a colour; use a name such as white or black, or #rrggbb"
        ) from None


def _items(scan: TreeScan) -> list[tuple[ImageRecord, str | None]]:
    """Every image of a scan in path order, with its caption error if the sidecar was unreadable."""
    items = [(r, None) for r in scan.records] + list(scan.caption_errors)
    return sorted(items, key=lambda item: item[0].path.relative_to(scan.root).as_posix())


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _write_atomic(path: Path, text: str) -> None:
    # Write-then-rename: a crash never leaves a half-written dataset.json that parses as finished.
    tmp = _tmp_name(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _shard_writer(out_dir: Path, max_samples: int, max_bytes: int) -> wds.ShardWriter:
    # A fixed mtime and no encoder (every member is bytes already): the same input gives
    # byte-identical shards on every run, so a re-run can be checked with sha1sum.
    return wds.ShardWriter(
        str(out_dir / SHARD_PATTERN), maxcount=max_samples, maxsize=max_bytes, verbose=0, encoder=False, mtime=0.0
    )


def _write_shards(
    scans: list[tuple[TreeScan, bool]],
    settings: SampleSettings,
    out_dir: Path,
    max_samples: int,
    max_bytes: int,
    tally: PrepareTally,
) -> tuple[list[dict], dict]:
    """Writes every usable image as a sample, tallying each file; returns the shard list and index."""
    for scan, _ in scans:
        for path in scan.other_files:
            # `lorafit caption`/`review` keep the previous caption as x.txt.bak: expected, not worth a line.
            if path.name.endswith(f"{settings.caption_ext}.bak"):
                continue
            tally.add_ignored(path, f"not an image or a {settings.caption_ext} caption of one")
    shard_counts: dict[str, int] = {}
    index: dict[str, list] = {}
    seen: dict[str, Path] = {}
    total = sum(scan.image_count for scan, _ in scans)
    with (
        tqdm(total=total, desc="lorafit prepare", unit="img") as bar,
        _shard_writer(out_dir, max_samples, max_bytes) as writer,
    ):
        for scan, is_reg in scans:
            for record, caption_error in _items(scan):
                bar.update(1)
                try:
                    if caption_error is not None:
                        raise SkipFile(caption_error)
                    sample = prepare_file(record, scan.root, is_reg, settings, seen)
                except SkipFile as skip:
                    tally.add_skipped(scan.root, record, is_reg, str(skip))
                    continue
                key = f"{tally.samples_written:08d}"
                meta = json.dumps({"key": key, **sample.meta}, ensure_ascii=False, sort_keys=True)
                members = {
                    "__key__": key,
                    sample.image_ext: sample.image_bytes,
                    "txt": sample.caption.encode("utf-8"),
                    "json": meta.encode("utf-8"),
                }
                if sample.mask is not None:
                    members[MASK_MEMBER] = sample.mask
                writer.write(members)
                # After write(): ShardWriter may have just rolled over to the next file.
                name = os.path.basename(writer.fname)
                shard_counts[name] = shard_counts.get(name, 0) + 1
                meta = sample.meta
                index.setdefault(name, []).append([meta["w"], meta["h"], meta["repeats"], int(is_reg)])
                tally.add_written(scan.root, record, is_reg, sample)
                bar.set_postfix(skipped=len(tally.skipped), refresh=False)
    shards = [
        {"name": name, "samples": n, "bytes": (out_dir / name).stat().st_size}
        for name, n in sorted(shard_counts.items())
    ]
    return shards, {
        "format": "lorafit-index",
        "version": 1,
        "shards": [{"name": name, "samples": index[name]} for name, _ in sorted(shard_counts.items())],
    }


def prepare(
    src: str | list[str],
    *,
    out: str,
    reg: str | list[str] | None = None,
    caption_ext: str = ".txt",
    resolution: int = 1024,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 2048,
    bucket_reso_steps: int = 64,
    bucket_no_upscale: bool = False,
    drop_small: bool = False,
    alpha_background: str = "white",
    alpha_mask: bool = False,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
) -> dict:
    """Convert kohya-style image folders into webdataset shards with a summary and a report.

    Bad files (corrupt, truncated, empty, not images, duplicates, uncaptioned outside a concept
    folder) are skipped and listed in report.md with the reason; the run goes on. Source folders
    are only read, never changed. dataset.json is written last and marks a finished run.

    Args:
        src: Training folder(s) in kohya layout: 'N_<trigger> <class>' folders (e.g. '10_ohwx dog'),
            nested sub-folders, caption sidecars. Several: `lorafit prepare dir1 dir2 --out x`.
        out: Output folder for train-NNNNNN.tar shards, report.md and dataset.json.
        reg: Regularization folder(s) in the same layout (e.g. '1_dog'); their samples get
            is_reg true and, without a caption file, their folder's class prompt as caption.
        caption_ext: Extension of the caption sidecar files (.txt or .caption).
        resolution: Training resolution; buckets hold at most resolution^2 pixels.
        min_bucket_reso: Smallest bucket side; images with a shorter side are reported as small.
        max_bucket_reso: Largest bucket side (kohya: 1024 for SD1/SD2, 2048 for SDXL).
        bucket_reso_steps: Bucket side granularity in pixels (64; SDXL also allows 32).
        bucket_no_upscale: Give each image its own bucket no larger than the image (kohya's
            bucket_no_upscale) instead of the nearest-aspect bucket of the table.
        drop_small: Skip images smaller than the smallest bucket side instead of keeping them.
        alpha_background: Colour transparent pixels are composited onto: a name or #rrggbb.
        alpha_mask: Also keep a transparent image's alpha channel as its loss mask (kohya's
            ``alpha_mask``; see model.loss.mask_floor). A ``<stem>_mask.png`` beside an image is
            its loss mask either way, and wins over the alpha channel.
        max_samples_per_shard: Start a new shard after this many samples.
        max_shard_bytes: Start a new shard once a shard holds this many bytes.
        overwrite: Replace the shards, report.md and dataset.json of a non-empty output folder
            (other files there are left alone); without it a non-empty folder is refused.

    Returns:
        The summary also written to dataset.json: images_in, samples_written, reported_skips
        (images_in == samples_written + reported_skips), shards, folders, buckets,
        ss_tag_frequency, images_per_repeat, skipped/fixed/ignored files, settings.
    """
    src_roots, reg_roots = _roots(src, "SRC"), _roots(reg, "--reg")
    if not src_roots:
        raise LorafitError("no SRC folder given; pass the folder holding your 'N_<trigger> <class>' folders")
    for name, value in (("max_samples_per_shard", max_samples_per_shard), ("max_shard_bytes", max_shard_bytes)):
        if value < 1:
            raise LorafitError(f"{name} must be at least 1; got {value}")
    table = make_bucket_table(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
    out_dir = Path(out).expanduser()
    _check_layout(src_roots, reg_roots, out_dir)
    # Every check that can refuse the run happens before the output folder is touched.
    scans = [(scan_tree(root, caption_ext), False) for root in src_roots]
    scans += [(scan_tree(root, caption_ext), True) for root in reg_roots]
    for scan, is_reg in scans:
        if scan.image_count == 0:
            raise LorafitError(
                f"{'--reg' if is_reg else 'SRC'} folder {scan.root} holds no images "
                "(jpg, png, webp, bmp, tiff, gif); check the path"
            )
    settings = SampleSettings(
        caption_ext=scans[0][0].caption_ext,
        table=table,
        no_upscale=bucket_no_upscale,
        max_area=resolution * resolution,
        bucket_reso_steps=bucket_reso_steps,
        smallest_side=min(min(bucket) for bucket in table),
        drop_small=drop_small,
        background=_background(alpha_background),
        background_name=alpha_background,
        alpha_mask=alpha_mask,
    )
    _clear_output(out_dir, overwrite)

    tally = PrepareTally()
    shards, index = _write_shards(scans, settings, out_dir, max_samples_per_shard, max_shard_bytes, tally)
    run_settings = {
        "src": [str(r) for r in src_roots],
        "reg": [str(r) for r in reg_roots],
        "caption_ext": settings.caption_ext,
        "resolution": resolution,
        "min_bucket_reso": min_bucket_reso,
        "max_bucket_reso": max_bucket_reso,
        "bucket_reso_steps": bucket_reso_steps,
        "bucket_no_upscale": bucket_no_upscale,
        "drop_small": drop_small,
        "alpha_background": alpha_background,
        "alpha_mask": alpha_mask,
        "max_samples_per_shard": max_samples_per_shard,
        "max_shard_bytes": max_shard_bytes,
    }
    summary = tally.summary(run_settings, shards)
    report = out_dir / REPORT_NAME
    _write_atomic(report, render_report(summary))
    if summary["samples_written"] == 0:
        raise LorafitError(
            f"none of the {summary['images_in']} images could be used; see {report} for the reason of each"
        )
    _write_atomic(out_dir / INDEX_NAME, json.dumps(index, separators=(",", ":")) + "\n")
    _write_atomic(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    from_folder = [e["path"] for e in summary["fixed"] if any("used folder prompt" in n for n in e["notes"])]
    if from_folder:
        logger.warning(
            "%d images have no %s caption, so their folder name was used as the caption (e.g. %s); see %s",
            len(from_folder),
            settings.caption_ext,
            from_folder[0],
            report,
        )
    logger.info(
        "prepared %d of %d images into %d shards in %s (%d skipped, %d fixed or flagged); see %s",
        summary["samples_written"],
        summary["images_in"],
        len(shards),
        out_dir,
        summary["reported_skips"],
        len(summary["fixed"]),
        report,
    )
    return summary
