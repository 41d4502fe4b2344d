"""``lorafit prepare``: kohya-style image folders -> webdataset shards, a summary and a report.

Run once per dataset; training then always streams shards. The output folder holds::

    train-000000.tar ...   samples: <key>.jpg|png|webp (image), <key>.txt (caption), <key>.json
    report.md              what was written, skipped (with why) and fixed, per folder/bucket/tag
    index.json             per shard, each sample's [w, h, repeats, is_reg] in shard order: lets
                           the training DataModule plan equal, disjoint epochs for every DDP rank
                           without opening a shard (lorafit.data.shard_index)
    dataset.json           summary, written last: a folder without it is an unfinished run

Per-sample ``<key>.json`` fields: ``w``/``h`` (size after EXIF orientation), ``repeats``,
``subject``, ``class``, ``is_reg``, ``folder``, ``folder_prompt``, ``caption_source``
(``sidecar``/``folder``), ``source`` (absolute path), ``relpath``, ``sha1`` (of the source file),
``source_format``, ``stored`` (``original``/``jpeg``/``png``), ``fixes``, ``small``, ``bucket`` and
``bucket_resized`` (``[w, h]`` under the prepare settings) and ``aspect_error``.

Nothing is ever written into a source folder: files are only opened for reading, and an output
folder inside a source folder is refused. Which bytes are stored (original or re-encoded, and
why JPEG or PNG) is explained in :mod:`lorafit.data.prepare_sample`.

A run is three steps, each testable alone: :func:`~lorafit.data.prepare_plan.plan_prepare` checks
and scans everything and writes nothing; :func:`write_shards` turns each file into a sample (or a
reasoned skip) in the shards; :func:`finish` writes ``report.md``, ``index.json`` and, last,
``dataset.json``, and tells the user. :func:`prepare` is the command; :func:`prepare_staged` is the
training data module's way in: it writes into a temporary sibling folder, renames it into place
when complete and removes it when the run fails, so the cache never holds a half-written dataset
and the log names only paths that exist.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from lorafit.data.kohya_folders import ImageRecord, TreeScan
from lorafit.data.prepare_plan import DEFAULTS, PreparePlan, fit_config_settings, plan_prepare
from lorafit.data.prepare_report import PrepareTally, render_report, unusable_message
from lorafit.data.prepare_sample import SkipFile, prepare_file
from lorafit.errors import LorafitError
from lorafit.io.atomic import atomic_write_text, temporary_sibling

logger = logging.getLogger("lorafit.data")

SHARD_PATTERN = "train-%06d.tar"
SUMMARY_NAME = "dataset.json"
INDEX_NAME = "index.json"
REPORT_NAME = "report.md"


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
        ours += [temporary_sibling(out / name) for name in names]  # from a crashed run
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


def _items(scan: TreeScan) -> list[tuple[ImageRecord, str | None]]:
    """Every image of a scan in path order, with its caption error if the sidecar was unreadable."""
    items = [(r, None) for r in scan.records] + list(scan.caption_errors)
    return sorted(items, key=lambda item: item[0].path.relative_to(scan.root).as_posix())


def _shard_writer(out_dir: Path, max_samples: int, max_bytes: int) -> wds.ShardWriter:
    # A fixed mtime and no encoder (every member is bytes already): the same input gives
    # byte-identical shards on every run, so a re-run can be checked with sha1sum.
    return wds.ShardWriter(
        str(out_dir / SHARD_PATTERN), maxcount=max_samples, maxsize=max_bytes, verbose=0, encoder=False, mtime=0.0
    )


def write_shards(plan: PreparePlan, out_dir: Path, tally: PrepareTally) -> tuple[list[dict], dict]:
    """Step 2: every usable image as a sample in ``out_dir``, every file tallied; returns the shard list and index."""
    settings = plan.settings
    for scan, _ in plan.scans:
        for path in scan.other_files:
            # `lorafit caption`/`review` keep the previous caption as x.txt.bak: expected, not worth a line.
            if path.name.endswith(f"{settings.caption_ext}.bak"):
                continue
            tally.add_ignored(path, f"not an image or a {settings.caption_ext} caption of one")
        for link in scan.links:
            tally.add_link(link.path, link.target, link.problem)
    shard_counts: dict[str, int] = {}
    index: dict[str, list] = {}
    seen: dict[str, tuple[Path, str]] = {}
    with (
        tqdm(total=plan.image_count, desc="lorafit prepare", unit="img") as bar,
        _shard_writer(out_dir, plan.max_samples_per_shard, plan.max_shard_bytes) as writer,
    ):
        for scan, is_reg in plan.scans:
            for record, caption_error in _items(scan):
                bar.update(1)
                try:
                    if caption_error is not None:
                        raise SkipFile(caption_error, "caption_file")
                    sample = prepare_file(record, scan.root, is_reg, settings, seen)
                except SkipFile as skip:
                    tally.add_skipped(scan.root, record, is_reg, str(skip), skip.kind)
                    continue
                key = f"{tally.samples_written:08d}"
                meta = json.dumps({"key": key, **sample.meta}, ensure_ascii=False, sort_keys=True)
                writer.write(
                    {
                        "__key__": key,
                        sample.image_ext: sample.image_bytes,
                        "txt": sample.caption.encode("utf-8"),
                        "json": meta.encode("utf-8"),
                    }
                )
                # After write(): ShardWriter may have just rolled over to the next file.
                name = os.path.basename(writer.fname)
                shard_counts[name] = shard_counts.get(name, 0) + 1
                meta = sample.meta
                index.setdefault(name, []).append([meta["w"], meta["h"], meta["repeats"], int(is_reg)])
                tally.add_written(scan.root, record, is_reg, sample)
                if plan.caption_lengths is not None:
                    tokens = plan.caption_lengths.over_limit(sample.caption)
                    if tokens is not None:
                        tally.add_long_caption(record.path, tokens)
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


def finish(plan: PreparePlan, tally: PrepareTally, shards: list[dict], index: dict, out_dir: Path, shown: Path) -> dict:
    """Step 3: report.md, index.json and, last, dataset.json in ``out_dir``, and the log lines.

    Args:
        plan: The run's plan.
        tally: What step 2 counted.
        shards: Step 2's shard list.
        index: Step 2's index.
        out_dir: Where the files go.
        shown: The folder the user will find them in (``out_dir`` itself, or the final name of a
            staged folder): every logged path names it.

    Raises:
        LorafitError: no image could be used; the message says why, per kind of problem.
    """
    summary = tally.summary(plan.run_settings, shards)
    atomic_write_text(out_dir / REPORT_NAME, render_report(summary))
    report = shown / REPORT_NAME
    if summary["samples_written"] == 0:
        where = ", ".join(summary["settings"]["src"] + summary["settings"]["reg"])
        raise LorafitError(unusable_message(summary, where) + (f"; see {report}" if shown == out_dir else ""))
    atomic_write_text(out_dir / INDEX_NAME, json.dumps(index, separators=(",", ":")) + "\n")
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _log_findings(summary, plan, report)
    logger.info(
        "prepared %d of %d images into %d shards in %s (%d skipped, %d fixed or flagged); see %s",
        summary["samples_written"],
        summary["images_in"],
        len(shards),
        shown,
        summary["reported_skips"],
        len(summary["fixed"]),
        report,
    )
    return summary


def _log_findings(summary: dict, plan: PreparePlan, report: Path) -> None:
    """One warning per kind of finding a user should know before training (each file is in the report)."""
    fixed = summary["fixed"]
    ext = plan.settings.caption_ext

    def with_note(text: str) -> list[str]:
        return [e["path"] for e in fixed if any(text in note for note in e["notes"])]

    findings = [
        (with_note("used folder prompt"), f"{{n}} images have no {ext} caption, so their folder name was used instead"),
        (with_note("caption file is not UTF-8"), "{n} caption files are not UTF-8; they were decoded (see the report)"),
        ([e["path"] for e in summary["links"]], "{n} symlinks lead outside the dataset folder or loop"),
    ]
    if not plan.settings.size_chosen:
        side = plan.settings.smallest_side
        small = (
            f"{{n}} images are smaller than the smallest bucket side ({side} px) of prepare's defaults; pass "
            "--config with your fit config (or --resolution/--min_bucket_reso) to prepare for your size"
        )
        findings.append((with_note("smaller than the smallest bucket side"), small))
    if summary["long_captions"]:
        limit = summary["settings"]["caption_token_limit"]
        long = (
            f"{{n}} captions are longer than {limit} tokens, so training cuts them (model.max_token_length 150 "
            "or 225 reads up to 225)"
        )
        findings.append(([e["path"] for e in summary["long_captions"]], long))
    for paths, what in findings:
        if paths:
            logger.warning("%s (e.g. %s); see %s", what.format(n=len(paths)), paths[0], report)


def _settings(config: str | list[str] | None, explicit: dict) -> tuple[dict, bool]:
    """Every setting resolved: a flag, else the fit config's, else prepare's default; and whether the
    user chose the bucket sizes."""
    from_config = fit_config_settings(config) if config else {}
    values = {**DEFAULTS, **{k: v for k, v in from_config.items() if v is not None}}
    values.update({k: v for k, v in explicit.items() if v is not None})
    if from_config.get("tokenizer") and explicit.get("tokenizer") is None:
        values["tokenizer_from_config"] = True
    chosen = bool(config) or explicit.get("resolution") is not None or explicit.get("min_bucket_reso") is not None
    return values, chosen


def prepare(
    src: str | list[str],
    *,
    out: str,
    reg_dir: str | list[str] | None = None,
    config: str | list[str] | None = None,
    caption_ext: str | None = None,
    resolution: int | None = None,
    min_bucket_reso: int | None = None,
    max_bucket_reso: int | None = None,
    bucket_reso_steps: int | None = None,
    bucket_no_upscale: bool | None = None,
    drop_small: bool = False,
    alpha_background: str = "white",
    tokenizer: str | None = None,
    max_token_length: int | None = None,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    reg: str | list[str] | None = None,
) -> dict:
    """Convert kohya-style image folders into webdataset shards with a summary and a report.

    Bad files (corrupt, truncated, empty, not images, duplicates, uncaptioned outside a concept
    folder) are skipped and listed in report.md with the reason; the run goes on. Source folders
    are only read, never changed. dataset.json is written last and marks a finished run.

    Args:
        src: Training folder(s) in kohya layout: 'N_<trigger> <class>' folders (e.g. '10_ohwx dog'),
            nested sub-folders, caption sidecars. Several: `lorafit prepare dir1 dir2 --out x`.
        out: Output folder for train-NNNNNN.tar shards, report.md and dataset.json.
        reg_dir: Regularization folder(s) in the same layout (e.g. '1_dog'), as data.reg_dir; their
            samples get is_reg true and, without a caption file, their folder's class prompt as caption.
        config: A `lorafit fit` config (or several, composed): its data.* bucket settings and
            caption_ext become this run's defaults (what `fit` would prepare with), and its base
            model's tokenizer counts caption tokens. Flags given here still win.
        caption_ext: Extension of the caption sidecar files (.txt or .caption). Default: the
            config's, else .txt.
        resolution: Training resolution; buckets hold at most resolution^2 pixels. Default: the
            config's data.resolution, else 1024.
        min_bucket_reso: Smallest bucket side; images with a shorter side are reported as small.
            Default: the config's, else 256.
        max_bucket_reso: Largest bucket side (kohya: 1024 for SD1/SD2, 2048 for SDXL). Default: the
            config's, else 2048.
        bucket_reso_steps: Bucket side granularity in pixels (64; SDXL also allows 32). Default:
            the config's, else 64.
        bucket_no_upscale: Give each image its own bucket no larger than the image (kohya's
            bucket_no_upscale) instead of the nearest-aspect bucket of the table. Default: the
            config's, else false.
        drop_small: Skip images smaller than the smallest bucket side instead of keeping them.
        alpha_background: Colour transparent pixels are composited onto: a name or #rrggbb.
        tokenizer: Base model (diffusers folder or hub id) or tokenizer folder whose tokenizer
            counts caption tokens; captions longer than training reads are listed in the report.
            Default: the config's model.model.
        max_token_length: Caption tokens training reads (kohya's 150/225; default 75, CLIP's).
            Default: the config's model.max_token_length.
        max_samples_per_shard: Start a new shard after this many samples.
        max_shard_bytes: Start a new shard once a shard holds this many bytes.
        overwrite: Replace the shards, report.md and dataset.json of a non-empty output folder
            (other files there are left alone); without it a non-empty folder is refused.
        reg: Old spelling of reg_dir (still accepted, with a notice).

    Returns:
        The summary also written to dataset.json: images_in, samples_written, reported_skips
        (images_in == samples_written + reported_skips), shards, folders, buckets,
        ss_tag_frequency, images_per_repeat, skipped/fixed/ignored files, long captions,
        symlinks, settings.
    """
    reg_dir = _reg_dir(reg_dir, reg)
    explicit = dict(
        caption_ext=caption_ext,
        resolution=resolution,
        min_bucket_reso=min_bucket_reso,
        max_bucket_reso=max_bucket_reso,
        bucket_reso_steps=bucket_reso_steps,
        bucket_no_upscale=bucket_no_upscale,
        tokenizer=tokenizer,
        max_token_length=max_token_length,
    )
    values, chosen = _settings(config, explicit)
    values.update(
        drop_small=drop_small,
        alpha_background=alpha_background,
        max_samples_per_shard=max_samples_per_shard,
        max_shard_bytes=max_shard_bytes,
    )
    plan = plan_prepare(src, out, reg_dir, values, size_chosen=chosen)
    # Every check that can refuse the run happened in the plan, before the output folder is touched.
    _clear_output(plan.out_dir, overwrite)
    tally = PrepareTally()
    shards, index = write_shards(plan, plan.out_dir, tally)
    return finish(plan, tally, shards, index, plan.out_dir, plan.out_dir)


def _reg_dir(reg_dir, reg):
    if reg is None:
        return reg_dir
    if reg_dir is not None:
        raise LorafitError("give the regularization folders once: --reg_dir (--reg is its old spelling)")
    logger.warning("--reg is now spelled --reg_dir, as data.reg_dir (the old spelling still works)")
    return reg


def prepare_staged(src: str, out: str | os.PathLike, *, reg_dir: str | list[str] | None = None, **values) -> dict:
    """``prepare`` into ``<out>.tmp<pid>``, renamed to ``out`` when complete; nothing is left on failure.

    For the training data module, which prepares ``data.train_dir`` into its cache: a crash leaves
    no folder that looks prepared, a failed run no temporary folder, and every logged path is the
    final one. ``values`` are :func:`prepare`'s settings (no config: the data module passes its own).
    """
    final = Path(out)
    staging = final.with_name(f"{final.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    settings = {**DEFAULTS, "drop_small": False, "alpha_background": "white", **values}
    settings.setdefault("max_samples_per_shard", 1000)
    settings.setdefault("max_shard_bytes", 1 << 30)
    try:
        plan = plan_prepare(src, staging, reg_dir, settings, size_chosen=True)
        staging.mkdir(parents=True)
        tally = PrepareTally()
        shards, index = write_shards(plan, staging, tally)
        summary = finish(plan, tally, shards, index, staging, final)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
