"""The concept's own images and captions, for fidelity scores and the probe.

Read from wherever the user keeps them: a kohya-style image folder (``10_ohwx dog/...``), a
folder prepared by ``lorafit prepare`` (``dataset.json`` + shards; regularization samples are
left out: they show the class, not the concept), or plain caption text.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lorafit.data.images import load_rgb
from lorafit.data.prepare_sample import split_prompt
from lorafit.errors import LorafitError

SUMMARY_NAME = "dataset.json"  # lorafit.data.prepare.SUMMARY_NAME (not imported: pulls in webdataset writers)
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ReferenceSet:
    """Training images (possibly a sample of them), their captions, and the folder's naming.

    Attributes:
        images: RGB images.
        captions: Caption of each image (the folder prompt where there is no sidecar).
        subject: The concept folder's prompt (``ohwx dog`` from ``10_ohwx dog``), if any.
        class_word: Its class part (``dog``), if any.
    """

    images: list[Image.Image] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    subject: str | None = None
    class_word: str | None = None


def _pick(count: int, limit: int, seed: int) -> list[int]:
    """Up to ``limit`` indices, spread by a seeded shuffle (not the first N of one folder)."""
    indices = list(range(count))
    if count > limit:
        indices = sorted(random.Random(seed).sample(indices, limit))
    return indices


def _from_folder(root: Path, limit: int, seed: int, caption_ext: str) -> ReferenceSet:
    from lorafit.data.kohya_folders import scan_tree

    scan = scan_tree(root, caption_ext)
    records = scan.records
    if not records:
        raise LorafitError(f"no images found under {root}; give the folder holding the training images")
    prompt = next((r.folder_prompt for r in records if r.folder_prompt), None)
    subject_word, class_word = split_prompt(prompt, is_reg=False)
    chosen = [records[i] for i in _pick(len(records), limit, seed)]
    return ReferenceSet(
        images=[load_rgb(r.path) for r in chosen],
        captions=[r.training_caption for r in chosen],
        subject=prompt,
        class_word=class_word if subject_word else None,
    )


def _from_prepared(root: Path, limit: int, seed: int) -> ReferenceSet:
    import tarfile

    summary = json.loads((root / SUMMARY_NAME).read_text(encoding="utf-8"))
    samples: dict[str, dict] = {}
    for shard in summary.get("shards", []):
        # Plain tarfile: a prepared folder's shards are small local tars, and this keeps the
        # probe free of webdataset's pipeline machinery (and its per-worker splitting).
        with tarfile.open(root / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read() if member.isfile() else None
                if data is not None:
                    samples.setdefault(key, {})[ext] = data
    instance = []
    for key in sorted(samples):
        parts = samples[key]
        meta = json.loads(parts.get("json", b"{}"))
        image_key = next((k for k in _IMAGE_KEYS if k in parts), None)
        if image_key is None or meta.get("is_reg"):
            continue
        instance.append((parts[image_key], parts.get("txt", b"").decode("utf-8"), meta))
    if not instance:
        raise LorafitError(f"{root}: the prepared dataset holds no (non-regularization) samples")
    chosen = [instance[i] for i in _pick(len(instance), limit, seed)]
    meta = chosen[0][2]
    subject = meta.get("folder_prompt")
    return ReferenceSet(
        images=[Image.open(io.BytesIO(data)).convert("RGB") for data, _, _ in chosen],
        captions=[caption for _, caption, _ in chosen],
        subject=subject,
        class_word=meta.get("class") if meta.get("subject") else None,
    )


def load_reference_set(
    source: str, limit: int = 16, seed: int = 0, caption_ext: str = ".txt", key: str = "--train_images"
) -> ReferenceSet:
    """Up to ``limit`` training images with captions from a kohya folder or a prepared dataset folder.

    A ``.txt`` file gives captions only (one per line, ``#`` comments), without images.
    """
    root = Path(source).expanduser()
    if root.is_file() and root.suffix.lower() == ".txt":
        # Captions alone (one per line): enough to draw, not to compare.
        lines = [line.strip() for line in root.read_text(encoding="utf-8").splitlines()]
        captions = [line for line in lines if line and not line.startswith("#")]
        return ReferenceSet(captions=[captions[i] for i in _pick(len(captions), limit, seed)])
    if not root.is_dir():
        raise LorafitError(
            f"{key}: {source} is neither a folder nor a .txt file of captions; give the training "
            "image folder, a `lorafit prepare` output folder or a captions file"
        )
    if (root / SUMMARY_NAME).is_file():
        return _from_prepared(root, limit, seed)
    return _from_folder(root, limit, seed, caption_ext)
