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

A run is three steps, each testable alone: :func:`~lorafit.data.prepare_plan.plan_prepare` checks
and scans everything and writes nothing; :func:`write_shards` turns each file into a sample (or a
reasoned skip) in the shards; :func:`finish` writes ``report.md``, ``index.json`` and, last,
``dataset.json``, and tells the user. :func:`prepare` is the command; :func:`prepare_staged` is the
training data module's way in: it writes into a temporary sibling folder, renames it into place
when complete and removes it when the run fails, so the cache never holds a half-written dataset
and the log names only paths that exist.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import yaml

from lorafit.data.prepare_plan import DEFAULTS, plan_prepare
from lorafit.data.prepare_report import PrepareTally
from lorafit.data.prepare_write import INDEX_NAME, REPORT_NAME, SUMMARY_NAME, finish, write_shards
from lorafit.errors import LorafitError
from lorafit.io.atomic import temporary_sibling
from lorafit.io.write_errors import one_line_write_error

logger = logging.getLogger("lorafit.data")

# Keys of a fit config's data section that prepare takes over (enable_bucket changes the ranges).
_DATA_KEYS = (*DEFAULTS, "enable_bucket")


def _find(section: Any, key: str) -> Any:
    """``section[key]``, or the first ``key`` in its nested groups (``model.*`` is being grouped)."""
    if not isinstance(section, dict):
        return None
    if key in section:
        return section[key]
    return next((v for v in (_find(sub, key) for sub in section.values()) if v is not None), None)


def fit_config_settings(configs: str | list[str]) -> dict[str, Any]:
    """The prepare settings a ``lorafit fit`` config implies: its ``data.*`` bucket settings and
    caption extension (the data module's defaults where it sets none: what ``fit`` itself would use)
    and its base model's tokenizer. Later files override earlier ones, as in ``lorafit fit``.

    Raises:
        LorafitError: a config file is missing or is not YAML.
    """
    from lorafit.data.datamodule import LoraDataModule  # its defaults are what `fit` prepares with

    data: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for path in [configs] if isinstance(configs, str) else configs:
        try:
            loaded = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8")) or {}
        except OSError as err:
            raise LorafitError(f"--fit_config {path}: cannot read it ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise LorafitError(f"--fit_config {path} is not YAML ({' '.join(str(err).split())[:160]})") from None
        data.update((loaded.get("data") or {}) if isinstance(loaded, dict) else {})
        model.update((loaded.get("model") or {}) if isinstance(loaded, dict) else {})
    data = data.get("init_args", data)
    parameters = inspect.signature(LoraDataModule.__init__).parameters
    defaults = {name: parameters[name].default for name in _DATA_KEYS}
    settings = {key: data.get(key, defaults[key]) for key in _DATA_KEYS}
    if not settings.pop("enable_bucket"):  # the data module's square crops: one bucket, as it prepares them
        resolution = settings["resolution"]
        settings.update(min_bucket_reso=resolution, max_bucket_reso=resolution, bucket_reso_steps=8)
        settings["bucket_no_upscale"] = False
    # A single-file base holds no tokenizer files; its single_file_config folder has them.
    base = _find(model, "single_file_config") or _find(model, "model")
    settings["tokenizer"] = base if isinstance(base, str) else None
    settings["max_token_length"] = _find(model, "max_token_length")
    return settings


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
    fit_config: str | list[str] | None = None,
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
    alpha_mask: bool = False,
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
        fit_config: A `lorafit fit` config (or several, composed): its data.* bucket settings and
            caption_ext become this run's defaults (what `fit` would prepare with), and its base
            model's tokenizer counts caption tokens. Flags given here still win. (Not --config,
            which every lorafit verb reads as a file of its own options.)
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
        alpha_mask: Also keep a transparent image's alpha channel as its loss mask (kohya's
            ``alpha_mask``; see model.loss.mask_floor). A ``<stem>_mask.png`` beside an image is
            its loss mask either way, and wins over the alpha channel.
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
    values, chosen = _settings(fit_config, explicit)
    values.update(
        drop_small=drop_small,
        alpha_background=alpha_background,
        max_samples_per_shard=max_samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        alpha_mask=alpha_mask,
    )
    plan = plan_prepare(src, out, reg_dir, values, size_chosen=chosen)
    # Every check that can refuse the run happened in the plan, before the output folder is touched.
    try:
        _clear_output(plan.out_dir, overwrite)
        tally = PrepareTally()
        shards, index = write_shards(plan, plan.out_dir, tally)
        return finish(plan, tally, shards, index, plan.out_dir, plan.out_dir)
    except OSError as error:  # a full disk, a read-only --out: one line (dataset.json is not written)
        unfinished = "the folder holds no dataset.json, so nothing takes it for a prepared dataset; run prepare again"
        converted = one_line_write_error(error, plan.out_dir, "out", unfinished)
        if converted is None:
            raise
        raise converted from None


def _reg_dir(reg_dir, reg):
    if reg is None:
        return reg_dir
    if reg_dir is not None:
        raise LorafitError("give the regularization folders once: --reg_dir (--reg is its old spelling)")
    logger.warning("--reg is now spelled --reg_dir, as data.reg_dir (the old spelling still works)")
    return reg
