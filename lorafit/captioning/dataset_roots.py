"""Which image folders ``lorafit caption`` / ``lorafit review`` work on, given the folder a user names.

Either a kohya-style tree (``train/10_ohwx dog/...``), used as is, or the output folder of
``lorafit prepare``. Prepared shards are tar files: their captions cannot be edited in place, and
prepare never writes images out as loose files. Its ``dataset.json`` records the source folders,
so a prepared folder stands for those: captions are fixed there (before sharding) and
``lorafit prepare --overwrite`` is run again to put them into the shards.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.captioning")

PREPARE_SUMMARY = "dataset.json"  # lorafit.data.prepare.SUMMARY_NAME, without importing webdataset


@dataclass(frozen=True)
class DatasetRoots:
    """The image folders behind a user's DIR argument.

    Attributes:
        roots: Folders to scan, in order (one for a kohya tree; prepare's SRC then --reg folders).
        prepared_from: The prepare output folder DIR named, or None when DIR is itself a tree.
    """

    roots: list[Path]
    prepared_from: Path | None = None

    def reminder(self) -> str | None:
        """What to run after changing captions of a prepared dataset (None for a plain tree)."""
        if self.prepared_from is None:
            return None
        sources = " ".join(f"'{root}'" for root in self.roots)
        return (
            f"{self.prepared_from} holds shards made by `lorafit prepare` from {sources}; captions were "
            f"changed there - run `lorafit prepare ... --out {self.prepared_from} --overwrite` again "
            "to put them into the shards"
        )


def dataset_roots(directory: str | os.PathLike) -> DatasetRoots:
    """Resolves DIR to the folders whose caption sidecars are read and written.

    Args:
        directory: A kohya-style image tree, or a ``lorafit prepare`` output folder.

    Raises:
        LorafitError: DIR is missing or a file, or a prepared folder's source folders are gone.
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise LorafitError(
            f"DIR {path} does not exist; give the folder holding your images (or a `lorafit prepare` output folder)"
        )
    if not path.is_dir():
        raise LorafitError(f"DIR {path} is a file; give the folder holding your images")
    summary_path = path / PREPARE_SUMMARY
    if not summary_path.is_file():
        return DatasetRoots([path])
    try:
        settings = json.loads(summary_path.read_text(encoding="utf-8"))["settings"]
        sources = [Path(p) for p in settings["src"]] + [Path(p) for p in settings.get("reg") or []]
    except (ValueError, KeyError, TypeError):
        # A user's own dataset.json in an image folder: not ours, treat the folder as a tree.
        return DatasetRoots([path])
    missing = [str(p) for p in sources if not p.is_dir()]
    if missing:
        raise LorafitError(
            f"{path} was prepared from {', '.join(missing)}, which no longer exists; captions live "
            "beside the source images - point DIR at the image folder itself"
        )
    logger.info(
        "%s is a `lorafit prepare` output; working on its source folders %s", path, ", ".join(str(p) for p in sources)
    )
    return DatasetRoots(sources, prepared_from=path)
