"""``lorafit caption DIR``: write a caption sidecar for every image of a dataset with a model.

The step every guide starts with (kohya's "BLIP captioning" / "WD14 captioning" tabs): run a
captioning model over the training folder, then fix the captions by hand (``lorafit review``).
Existing captions are user work, so the default mode skips every image that already has one;
``overwrite`` and ``append`` keep the previous text in ``<caption>.bak``. An image that cannot be
decoded is reported with its reason and skipped; the others are still captioned.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from lorafit.captioning.dataset_roots import DatasetRoots, dataset_roots
from lorafit.captioning.tags import (
    append_caption,
    format_frequency,
    join_tags,
    parse_tag_list,
    split_tags,
    tag_frequency,
    with_prefix,
)
from lorafit.captioning.tags import remove_tags as drop_tags  # `remove_tags` is also caption()'s option
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.captioning")

Mode = Literal["skip", "overwrite", "append"]


@dataclass
class Job:
    """One image to caption and the sidecar its caption goes to."""

    image: Path
    sidecar: Path
    existing: str  # previous caption text ("" when none); kept in .bak when replaced


@dataclass
class Tally:
    """What a run did, for the summary it prints and returns."""

    written: list[str] = field(default_factory=list)  # caption texts, for the frequency summary
    skipped_existing: int = 0
    empty: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


def backup_path(sidecar: Path) -> Path:
    """Where the previous text of a caption file is kept: ``001.txt`` -> ``001.txt.bak``."""
    return sidecar.with_name(sidecar.name + ".bak")


def replace_caption(sidecar: Path, text: str, previous: str | None) -> None:
    """Writes ``text`` to ``sidecar`` atomically, first saving ``previous`` (if any) as ``.bak``.

    Shared with the review page. Both writes go through a temporary file and a rename, so a crash
    leaves either the old or the new caption, and the ``.bak`` is complete before it matters.
    """
    from lorafit.io.atomic import atomic_write_text

    if previous is not None:
        atomic_write_text(backup_path(sidecar), previous)
    atomic_write_text(sidecar, text if text.endswith("\n") or not text else text + "\n")


def _read_existing(sidecar: Path) -> str:
    from lorafit.data.caption_files import decode_caption

    if not sidecar.is_file():
        return ""
    # Bytes, not read_text: text mode would turn \r\n into \n, and append keeps the lines it does
    # not change (and the .bak) exactly as the user wrote them. Decoded as training reads captions
    # (UTF-16, Windows-1252 too): the scan that listed this file did so.
    return decode_caption(sidecar.read_bytes(), sidecar).text


def _jobs(directory: str | os.PathLike, caption_ext: str, mode: Mode, tally: Tally) -> tuple[list[Job], DatasetRoots]:
    from lorafit.data.kohya_folders import scan_tree

    roots = dataset_roots(directory)
    jobs: list[Job] = []
    for root in roots.roots:
        scan = scan_tree(root, caption_ext)
        for record, reason in scan.caption_errors:
            tally.failed.append((str(record.path), reason))
        for record in scan.records:
            sidecar = record.path.with_name(record.path.stem + scan.caption_ext)
            if mode == "skip" and record.caption is not None:
                tally.skipped_existing += 1
                continue
            jobs.append(Job(record.path, sidecar, _read_existing(sidecar)))
    return jobs, roots


def _load_captioner(
    model: str,
    model_type: str,
    general_threshold: float,
    character_threshold: float,
    device: str,
    dtype: str,
    max_new_tokens: int,
    num_beams: int,
):
    from lorafit.captioning import wd14_tagger

    local = Path(model).expanduser()
    if model_type == "auto":
        if local.is_dir():
            model_type = "wd14" if wd14_tagger.is_tagger_dir(local) else "image-to-text"
        else:  # a hub id: SmilingWolf's taggers all carry "tagger" in their name
            model_type = "wd14" if "tagger" in model.lower() else "image-to-text"
    if model_type == "wd14":
        folder = local if local.is_dir() else wd14_tagger.fetch_tagger(model)
        return wd14_tagger.WD14Tagger(folder, general_threshold, character_threshold, device)
    from lorafit.captioning.image_to_text import ImageToTextCaptioner

    return ImageToTextCaptioner(local if local.is_dir() else model, device, dtype, max_new_tokens, num_beams)


def _named(image: str | Path, reason: str) -> str:
    """The reason, led by the image's path unless the message already names it."""
    return reason if str(image) in reason else f"{image}: {reason}"


def _compose(raw: str, job: Job, mode: Mode, unwanted: list[str], prefix: str | None) -> str:
    text = join_tags(drop_tags(split_tags(raw), unwanted))
    if mode == "append":  # the tags and prefix go to the caption line; the file's other lines stay
        return append_caption(job.existing, text, prefix)
    return with_prefix(text, prefix)


def _caption_batch(
    captioner, batch: list[Job], tally: Tally, mode: Mode, unwanted: list[str], prefix: str | None
) -> None:
    from lorafit.data.images import load_rgb

    images, ready = [], []
    for job in batch:
        try:
            images.append(load_rgb(job.image))
            ready.append(job)
        except LorafitError as error:  # corrupt/truncated/not an image: report, go on with the rest
            tally.failed.append((str(job.image), str(error)))
            tqdm.write(f"skipped: {_named(job.image, str(error))}")
    if not images:
        return
    for job, raw in zip(ready, captioner(images)):
        text = _compose(raw, job, mode, unwanted, prefix)
        if not text.strip():
            tally.empty.append(str(job.image))
            continue
        replace_caption(job.sidecar, text, job.existing if job.existing.strip() else None)
        tally.written.append(text)


def caption(
    dir: str,
    *,
    model: str,
    model_type: Literal["auto", "image-to-text", "wd14"] = "auto",
    prefix: str | None = None,
    mode: Mode = "skip",
    remove_tags: str | list[str] | None = None,
    general_threshold: float = 0.35,
    character_threshold: float = 0.35,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 75,
    num_beams: int = 1,
    caption_ext: str = ".txt",
    top_tags: int = 30,
) -> dict:
    """Caption every image of a dataset with a BLIP-style model or a WD14 tagger.

    Writes <image stem><caption_ext> beside each image (kohya folder trees, nested folders too).
    Images with a caption are skipped unless --mode says otherwise; a corrupt image is reported
    and skipped. Prints a progress bar and the most frequent tags at the end.

    Args:
        dir: Image folder (kohya layout: '10_ohwx dog/' folders) or a `lorafit prepare` output
            folder, which stands for its source folders.
        model: Captioning model: a local folder or Hugging Face hub id. A folder holding
            model.onnx + selected_tags.csv is a WD14 tagger; anything else loads with transformers
            (e.g. Salesforce/blip-image-captioning-large).
        model_type: auto (decide from the files or name), image-to-text (BLIP, BLIP-2) or wd14.
        prefix: Text put in front of every caption, e.g. the trigger word "ohwx dog,"
            (kohya's --caption_prefix); never added twice.
        mode: Images that already have a caption: skip them (default, never touches your work),
            overwrite the caption file, or append the new tags to the caption line (the first
            non-empty line, the one training reads; the file's other lines are kept as they are).
            Both keep the old text as .bak.
        remove_tags: Tags never written, comma-separated or repeated (kohya's --undesired_tags);
            compared case-insensitively, "long_hair" matches "long hair".
        general_threshold: WD14: probability a general tag needs (kohya's --general_threshold).
        character_threshold: WD14: probability a character tag needs (kohya's --character_threshold).
        batch_size: Images per model call.
        device: auto (CUDA when available), cpu, cuda or cuda:N.
        dtype: Model weights for image-to-text models: auto (float16 on CUDA, float32 on CPU),
            float32, float16 or bfloat16. WD14 ONNX taggers run in the precision they were exported in.
        max_new_tokens: Image-to-text: longest caption in tokens (kohya's --max_length).
        num_beams: Image-to-text: beam width, 1 = greedy (kohya's --beam_search used 3).
        caption_ext: Extension of the caption sidecar files (.txt or .caption).
        top_tags: How many of the most frequent tags the final summary lists.

    Returns:
        written, skipped_existing, empty (images no tag passed the thresholds for), failed
        ([image, reason] pairs) and tag_frequency of the captions written.
    """
    if batch_size < 1:
        raise LorafitError(f"--batch_size must be at least 1; got {batch_size}")
    if mode not in ("skip", "overwrite", "append"):
        raise LorafitError(f"--mode {mode!r} is not one of skip, overwrite, append")
    tally = Tally()
    jobs, roots = _jobs(dir, caption_ext, mode, tally)
    unwanted = parse_tag_list(remove_tags)
    if jobs:
        captioner = _load_captioner(
            model, model_type, general_threshold, character_threshold, device, dtype, max_new_tokens, num_beams
        )
        with tqdm(total=len(jobs), unit="img", desc=f"captioning ({captioner.kind})") as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                _caption_batch(captioner, batch, tally, mode, unwanted, prefix)
                bar.update(len(batch))
    frequency = tag_frequency(tally.written)
    print(
        f"captioned {len(tally.written)} images, skipped {tally.skipped_existing} with a caption "
        f"(--mode {mode}), {len(tally.failed)} failed, {len(tally.empty)} got no tag"
    )
    for image, reason in tally.failed:
        print(f"  failed: {_named(image, reason)}")
    for image in tally.empty:
        print(f"  no tag passed the thresholds, nothing written: {image}")
    print(format_frequency(frequency, len(tally.written), top_tags))
    if roots.reminder() and tally.written:
        print(roots.reminder())
    return {
        "written": len(tally.written),
        "skipped_existing": tally.skipped_existing,
        "empty": tally.empty,
        "failed": [list(item) for item in tally.failed],
        "tag_frequency": dict(frequency.most_common()),
    }
