"""Steps 2 and 3 of ``lorafit prepare``: write the shards, then the report, the index and the summary.

:func:`write_shards` turns each planned file into a sample (or a reasoned skip) in the shards;
:func:`finish` writes ``report.md``, ``index.json`` and, last, ``dataset.json`` (a folder without it
is an unfinished run) and logs one line per kind of finding. :func:`prepare_staged` is the
training data module's way in: it plans and writes into a temporary sibling folder, renamed into
place when complete and removed when the run fails, so the cache never holds a half-written
dataset, no temporary folder stays behind, and the log names only paths that exist.
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
from lorafit.data.masks import MEMBER as MASK_MEMBER
from lorafit.data.prepare_plan import DEFAULTS, PreparePlan, plan_prepare
from lorafit.data.prepare_report import PrepareTally, render_report, unusable_message
from lorafit.data.prepare_sample import SkipFile, prepare_file
from lorafit.errors import LorafitError
from lorafit.io.atomic import atomic_write_text

logger = logging.getLogger("lorafit.data")

SHARD_PATTERN = "train-%06d.tar"
SUMMARY_NAME = "dataset.json"
INDEX_NAME = "index.json"
REPORT_NAME = "report.md"


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
        (with_note("caption file is not UTF-8"), "{n} caption files are not UTF-8 and were decoded"),
        ([e["path"] for e in summary["links"]], "{n} symlinks lead outside the dataset folder or loop"),
    ]
    if not plan.settings.size_chosen:
        side = plan.settings.smallest_side
        small = (
            f"{{n}} images are smaller than the smallest bucket side ({side} px) of prepare's defaults; pass "
            "--fit_config with your fit config (or --resolution/--min_bucket_reso) to prepare for your size"
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
