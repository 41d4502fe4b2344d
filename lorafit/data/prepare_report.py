"""What ``lorafit prepare`` tells the user: the ``dataset.json`` summary and the ``report.md`` report.

:class:`PrepareTally` collects one event per file (written, skipped, ignored) while the shards
are written; :meth:`PrepareTally.summary` turns it into the JSON-ready summary, and
:func:`render_report` renders the Markdown report *from that summary*, so the two never disagree.

The tag statistics use kohya's ``ss_tag_frequency`` form, ``{folder name: {tag: images}}`` with tags
split on commas and lower-cased, so the numbers match what kohya would later write into a LoRA's metadata.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.buckets import BucketChoice, BucketStats
from lorafit.data.kohya_folders import ImageRecord
from lorafit.data.prepare_sample import PreparedSample

# Skip kinds (lorafit.data.prepare_sample.SkipFile.kind) as the one-line error of a run with no
# usable image words them: "none of the 3 images could be used: 3 have no caption ...".
SKIP_KINDS = {
    "no_caption": "have no caption and no 'N_<trigger> <class>' folder name to take one from",
    "caption_file": "have a caption file that cannot be read as text",
    "duplicate": "are exact duplicates of another image",
    "undecodable": "are not images Pillow can decode (corrupt, truncated or another format)",
    "empty": "are empty files",
    "unreadable": "cannot be read (permissions)",
    "small": "are smaller than the smallest bucket side, and drop_small is set",
    "no_bucket": "fit no bucket",
    "mask": "have a _mask.png that cannot be read or does not match the image",
}
SUMMARY_FORMAT = "lorafit-prepare"
SUMMARY_VERSION = 1
_TOP_TAGS = 25
_STORED = {"original": "as the original bytes", "jpeg": "re-encoded as JPEG", "png": "re-encoded as PNG"}


@dataclass
class _FolderCount:
    root: str
    folder: str
    is_reg: bool
    repeats: int
    images_in: int = 0
    written: int = 0
    skipped: int = 0


def _tags(caption: str) -> list[str]:
    # As kohya's BaseDataset.set_tag_frequency: split on commas, strip, drop empty pieces and
    # lower-case; a tag repeated within one caption counts once per occurrence.
    return [tag.strip().lower() for tag in caption.split(",") if tag.strip()]


@dataclass
class PrepareTally:
    """Running counts of one ``prepare`` run."""

    folders: dict[tuple[str, str, bool], _FolderCount] = field(default_factory=dict)
    tag_frequency: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    repeat_images: dict[tuple[bool, int], int] = field(default_factory=Counter)
    choices: list[BucketChoice] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    fixed: list[dict] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)
    long_captions: list[dict] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)
    stored: Counter = field(default_factory=Counter)
    masks: Counter = field(default_factory=Counter)  # loss masks by source: file, alpha
    images_in: int = 0
    instance_samples: int = 0
    reg_samples: int = 0
    small: int = 0

    def _folder(self, root: Path, record: ImageRecord, is_reg: bool) -> _FolderCount:
        key = (str(root), record.folder, is_reg)
        if key not in self.folders:
            self.folders[key] = _FolderCount(str(root), record.folder, is_reg, record.repeats)
        return self.folders[key]

    def add_written(self, root: Path, record: ImageRecord, is_reg: bool, sample: PreparedSample) -> None:
        """Counts a written sample."""
        self.images_in += 1
        folder = self._folder(root, record, is_reg)
        folder.images_in += 1
        folder.written += 1
        if is_reg:
            self.reg_samples += 1
        else:
            self.instance_samples += 1
        self.tag_frequency[record.folder].update(_tags(sample.caption))
        self.repeat_images[(is_reg, record.repeats)] += 1
        self.choices.append(sample.choice)
        self.stored[sample.meta["stored"]] += 1
        self.small += int(sample.meta["small"])
        if sample.mask is not None:
            self.masks[sample.meta["mask"]] += 1
        if sample.notes:
            self.fixed.append({"path": str(record.path), "notes": sample.notes})

    def add_skipped(self, root: Path, record: ImageRecord, is_reg: bool, reason: str, kind: str) -> None:
        """Counts an image file that did not become a sample (``kind``: a key of :data:`SKIP_KINDS`)."""
        self.images_in += 1
        folder = self._folder(root, record, is_reg)
        folder.images_in += 1
        folder.skipped += 1
        self.skipped.append({"path": str(record.path), "reason": reason, "kind": kind})

    def add_ignored(self, path: Path, reason: str) -> None:
        """Notes a non-image file; it is not an input image and is not counted in ``images_in``."""
        self.ignored.append({"path": str(path), "reason": reason})

    def add_long_caption(self, path: Path, tokens: int) -> None:
        """Notes a written sample whose caption training will cut."""
        self.long_captions.append({"path": str(path), "tokens": tokens})

    def add_link(self, path: Path, target: Path, problem: str) -> None:
        """Notes a symlink that leads outside its dataset folder or loops."""
        self.links.append({"path": str(path), "target": str(target), "problem": problem})

    @property
    def samples_written(self) -> int:
        return self.instance_samples + self.reg_samples

    def _repeat_weights(self, is_reg: bool) -> dict[str, dict]:
        rows = {r: n for (reg, r), n in self.repeat_images.items() if reg == is_reg}
        total = sum(r * n for r, n in rows.items())
        return {
            str(r): {"images": n, "samples_per_epoch": r * n, "share": round(r * n / total, 4)}
            for r, n in sorted(rows.items(), reverse=True)
        }

    def summary(self, settings: dict, shards: list[dict]) -> dict:
        """The ``dataset.json`` content (also what ``prepare`` returns)."""
        stats = BucketStats.from_choices(self.choices)
        return {
            "format": SUMMARY_FORMAT,
            "version": SUMMARY_VERSION,
            "images_in": self.images_in,
            "samples_written": self.samples_written,
            "reported_skips": len(self.skipped),
            "instance_samples": self.instance_samples,
            "reg_samples": self.reg_samples,
            "stored": dict(sorted(self.stored.items())),
            "small_images": self.small,
            "loss_masks": dict(sorted(self.masks.items())),
            "settings": settings,
            "shards": shards,
            "shard_pattern": _brace_pattern(shards),
            "folders": [vars(f) for f in self.folders.values()],
            "images_per_repeat": {"instance": self._repeat_weights(False), "reg": self._repeat_weights(True)},
            "buckets": {f"{w}x{h}": n for (w, h), n in stats.counts.items()},
            "mean_aspect_error": round(stats.mean_aspect_error, 6),
            "ss_tag_frequency": {folder: dict(c.most_common()) for folder, c in self.tag_frequency.items()},
            "skipped": self.skipped,
            "fixed": self.fixed,
            "ignored": self.ignored,
            "long_captions": self.long_captions,
            "links": self.links,
        }


def unusable_message(summary: dict, where: str) -> str:
    """The one-line error of a run that wrote no sample: why, by kind, with the first file as example."""
    kinds = Counter(entry.get("kind", "other") for entry in summary["skipped"])
    why = "; ".join(f"{n} {SKIP_KINDS.get(kind, 'were skipped')}" for kind, n in kinds.most_common())
    first = summary["skipped"][0] if summary["skipped"] else None
    example = f" - e.g. {first['path']}: {first['reason']}" if first else ""
    return f"none of the {summary['images_in']} images in {where} could be used: {why}{example}"


def _brace_pattern(shards: list[dict]) -> str:
    """``train-{000000..000002}.tar``: one string for a DataModule's ``shards`` setting."""
    names = [s["name"] for s in shards]
    if len(names) <= 1:
        return names[0] if names else ""
    first, last = names[0][len("train-") : -len(".tar")], names[-1][len("train-") : -len(".tar")]
    return f"train-{{{first}..{last}}}.tar"


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def render_report(summary: dict) -> str:
    """The human report (``report.md``): counts, buckets, tags, repeats and every problem file."""
    s, cfg = summary, summary["settings"]
    total_bytes = sum(sh["bytes"] for sh in s["shards"])
    sources = ", ".join(cfg["src"]) + (f"; regularization: {', '.join(cfg['reg'])}" if cfg["reg"] else "")
    lines = [
        "# lorafit prepare report",
        "",
        (
            f"**{s['images_in']} images in = {s['samples_written']} samples written + "
            f"{s['reported_skips']} skipped** ({s['instance_samples']} instance, {s['reg_samples']} "
            f"regularization; {len(s['ignored'])} non-image files ignored)."
        ),
        "",
        f"- Shards: {len(s['shards'])} ({total_bytes / 1e6:.1f} MB), `{s['shard_pattern']}`",
        "- Stored: " + ", ".join(f"{n} {_STORED[how]}" for how, n in s["stored"].items()),
        f"- Sources: {sources}",
        "- Loss masks: "
        + (
            ", ".join(f"{n} from {'_mask files' if how == 'file' else 'alpha channels'}" for how, n in masks.items())
            if (masks := s.get("loss_masks"))
            else "none"
        ),
        (
            f"- Buckets: resolution {cfg['resolution']}, sides {cfg['min_bucket_reso']}..{cfg['max_bucket_reso']}"
            f" in steps of {cfg['bucket_reso_steps']}, bucket_no_upscale {cfg['bucket_no_upscale']}, "
            f"drop_small {cfg['drop_small']}; transparency composited onto {cfg['alpha_background']}"
        ),
        "",
        "## Folders",
        "",
    ]
    lines += _table(
        ["root", "folder", "reg", "repeats", "images", "written", "skipped"],
        [
            [
                f["root"],
                f["folder"],
                "yes" if f["is_reg"] else "",
                f["repeats"],
                f["images_in"],
                f["written"],
                f["skipped"],
            ]
            for f in s["folders"]
        ],
    )
    lines += ["## Images per repeat weight", ""]
    rows = [
        [kind, r, row["images"], row["samples_per_epoch"], f"{row['share']:.0%}"]
        for kind in ("instance", "reg")
        for r, row in s["images_per_repeat"][kind].items()
    ]
    lines += _table(["kind", "repeats", "images", "samples per epoch", "share of its kind"], rows)
    lines += ["## Buckets", ""]
    lines += _table(["bucket (w x h)", "images"], [[b, n] for b, n in s["buckets"].items()])
    lines += [f"Mean aspect-ratio error: {s['mean_aspect_error']:.4f}", ""]
    totals: Counter = Counter()
    for counts in s["ss_tag_frequency"].values():
        totals.update(counts)
    lines += [f"## Top caption tags ({len(totals)} distinct)", ""]
    lines += _table(["tag", "images"], [[t, n] for t, n in totals.most_common(_TOP_TAGS)])
    lines += _file_list(f"Skipped files ({len(s['skipped'])})", [(e["path"], e["reason"]) for e in s["skipped"]])
    lines += _file_list(
        f"Fixed or flagged files ({len(s['fixed'])})", [(e["path"], "; ".join(e["notes"])) for e in s["fixed"]]
    )
    lines += _file_list(
        f"Ignored non-image files ({len(s['ignored'])})", [(e["path"], e["reason"]) for e in s["ignored"]]
    )
    lines += _file_list(
        f"Symlinks leading outside the dataset folder or looping ({len(s['links'])})",
        [(e["path"], f"-> {e['target']}: {e['problem']}") for e in s["links"]],
    )
    limit = cfg.get("caption_token_limit")
    if limit is None:
        lines += ["## Caption length", "", "Not checked: give --tokenizer MODEL or --fit_config FIT.yaml.", ""]
    else:
        title = f"Captions longer than {limit} tokens ({len(s['long_captions'])}; training cuts the rest)"
        rows = [(e["path"], f"{e['tokens']} tokens (tokenizer of {cfg['tokenizer']})") for e in s["long_captions"]]
        lines += _file_list(title, rows)
    return "\n".join(lines)


def _file_list(title: str, entries: list[tuple[str, str]]) -> list[str]:
    lines = [f"## {title}", ""]
    lines += [f"- `{path}`: {reason}" for path, reason in entries] or ["None."]
    return lines + [""]
