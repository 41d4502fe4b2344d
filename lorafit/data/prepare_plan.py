"""Step 1 of ``lorafit prepare``: every check and every decision, before a byte is written.

:func:`plan_prepare` takes the resolved settings, checks the folders and settings, scans the trees
and loads the caption tokenizer. Whatever can refuse the run refuses it here, so a refused run leaves the output folder
as it was. The plan then drives the write step (:mod:`lorafit.data.prepare`) and the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import ImageColor

from lorafit.data.buckets import make_bucket_table
from lorafit.data.caption_length import CaptionLengths, load_caption_lengths
from lorafit.data.kohya_folders import TreeScan, scan_tree
from lorafit.data.prepare_sample import SampleSettings
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

# prepare's own defaults, used when neither a flag nor a fit config gives the value.
DEFAULTS = {
    "caption_ext": ".txt",
    "resolution": 1024,
    "min_bucket_reso": 256,
    "max_bucket_reso": 2048,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "alpha_mask": False,
}


@dataclass(frozen=True)
class PreparePlan:
    """What one ``prepare`` run reads, how it prepares each file, and the settings it records.

    Attributes:
        src_roots: The SRC folders.
        reg_roots: The regularization folders.
        out_dir: The output folder (``prepare``'s ``--out``).
        scans: Each root's scan with whether it is a regularization root.
        settings: What every file is prepared against.
        run_settings: The settings recorded in ``dataset.json`` and the report.
        max_samples_per_shard: Shard size in samples.
        max_shard_bytes: Shard size in bytes.
        caption_lengths: Token counting, when a tokenizer was given.
    """

    src_roots: list[Path]
    reg_roots: list[Path]
    out_dir: Path
    scans: list[tuple[TreeScan, bool]]
    settings: SampleSettings
    run_settings: dict
    max_samples_per_shard: int
    max_shard_bytes: int
    caption_lengths: CaptionLengths | None

    @property
    def image_count(self) -> int:
        return sum(scan.image_count for scan, _ in self.scans)


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
    named = [("SRC", r) for r in src] + [("--reg_dir", r) for r in reg]
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


def _background(alpha_background: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(alpha_background)[:3]
    except ValueError:
        raise LorafitError(
            f"alpha_background {alpha_background!r} is not a colour; use a name such as white or black, or #rrggbb"
        ) from None


def plan_prepare(
    src: str | list[str],
    out: str | os.PathLike,
    reg_dir: str | list[str] | None,
    values: dict[str, Any],
    size_chosen: bool,
) -> PreparePlan:
    """Checks and scans everything; writes nothing (see the module docstring).

    Args:
        src: The SRC folder(s).
        out: The output folder.
        reg_dir: The regularization folder(s).
        values: Every other ``prepare`` argument, resolved (no None left for a setting).
        size_chosen: The user chose the bucket sizes (flags or a fit config), see
            :class:`~lorafit.data.prepare_sample.SampleSettings`.
    """
    src_roots, reg_roots = _roots(src, "SRC"), _roots(reg_dir, "--reg_dir")
    if not src_roots:
        raise LorafitError("no SRC folder given; pass the folder holding your 'N_<trigger> <class>' folders")
    for name in ("max_samples_per_shard", "max_shard_bytes"):
        if values[name] < 1:
            raise LorafitError(f"{name} must be at least 1; got {values[name]}")
    table = make_bucket_table(
        values["resolution"], values["min_bucket_reso"], values["max_bucket_reso"], values["bucket_reso_steps"]
    )
    out_dir = Path(out).expanduser()
    _check_layout(src_roots, reg_roots, out_dir)
    background = _background(values["alpha_background"])
    scans = [(scan_tree(root, values["caption_ext"]), False) for root in src_roots]
    scans += [(scan_tree(root, values["caption_ext"]), True) for root in reg_roots]
    for scan, is_reg in scans:
        if scan.image_count == 0:
            raise LorafitError(
                f"{'--reg_dir' if is_reg else 'SRC'} folder {scan.root} holds no images "
                "(jpg, png, webp, bmp, tiff, gif); check the path"
            )
    caption_lengths = None
    if values.get("tokenizer"):
        try:
            caption_lengths = load_caption_lengths(values["tokenizer"], values.get("max_token_length"))
        except LorafitError as err:
            if not values.get("tokenizer_from_config"):
                raise
            logger.warning("caption lengths not checked: the fit config's model gave no tokenizer (%s)", err)
    settings = SampleSettings(
        caption_ext=scans[0][0].caption_ext,
        table=table,
        no_upscale=values["bucket_no_upscale"],
        max_area=values["resolution"] ** 2,
        bucket_reso_steps=values["bucket_reso_steps"],
        smallest_side=min(min(bucket) for bucket in table),
        drop_small=values["drop_small"],
        background=background,
        background_name=values["alpha_background"],
        size_chosen=size_chosen,
        alpha_mask=values["alpha_mask"],
    )
    recorded = (
        "resolution",
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
        "drop_small",
        "alpha_background",
        "alpha_mask",
        "max_samples_per_shard",
        "max_shard_bytes",
    )
    run_settings = {
        "src": [str(r) for r in src_roots],
        "reg": [str(r) for r in reg_roots],
        "caption_ext": settings.caption_ext,
        **{key: values[key] for key in recorded},
    }
    if caption_lengths is not None:
        run_settings["tokenizer"] = caption_lengths.source
        run_settings["caption_token_limit"] = caption_lengths.limit
    return PreparePlan(
        src_roots,
        reg_roots,
        out_dir,
        scans,
        settings,
        run_settings,
        values["max_samples_per_shard"],
        values["max_shard_bytes"],
        caption_lengths,
    )
