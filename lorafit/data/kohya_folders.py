"""Scanning a kohya-style dataset tree into image records (pure: reads names and captions, no pixels).

The layout kohya sd-scripts, its GUI and most guides teach::

    train_dir/
      10_ohwx dog/          10 repeats per epoch, folder prompt "ohwx dog"
        001.jpg  001.txt    caption sidecar: same stem, caption extension
        closeups/002.png    nested folders inherit the nearest numbered ancestor
      1_dog/
        ...

Only folders whose name starts with ``<digits>_`` are concept folders; any other folder is plain
organisation and passes the nearest concept folder's repeats and prompt down to its images.
Images lying directly in ``train_dir`` (or under no concept folder) are seen once per epoch.

This module is shared by the minimal folder DataModule and by ``lorafit prepare``, so it decides
nothing about pixels: it only says which files exist, how often each counts and what its caption is.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lorafit.data.masks import find_mask_sidecars
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

# Everything Pillow decodes that people actually put in training folders; compared lower-cased so
# "IMG_0001.JPG" from a camera counts too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif", ".gif")

# How many offending paths a warning lists before it says "...": enough to find the pattern,
# short enough to stay one readable line for a folder of a thousand uncaptioned images.
_EXAMPLES_SHOWN = 3

_KOHYA_NAME = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


class FolderName(NamedTuple):
    """What a folder name says: ``10_ohwx dog`` -> repeats 10, prompt ``ohwx dog``."""

    repeats: int | None
    prompt: str | None


@dataclass(frozen=True)
class ImageRecord:
    """One training image as found on disk.

    Attributes:
        path: The image file.
        caption: Text of the caption sidecar, or None when it is missing or empty.
        repeats: How many times the image is seen per epoch.
        folder_prompt: Prompt from the nearest ``N_<prompt>`` folder, or None outside one.
        folder: Name of that concept folder (else the image's own folder); groups kohya's
            ``ss_tag_frequency`` metadata the way kohya groups it, by subset folder.
        mask: The image's loss-mask sidecar (``<stem>_mask.png``, :mod:`lorafit.data.masks`), or None.
    """

    path: Path
    caption: str | None
    repeats: int
    folder_prompt: str | None
    folder: str
    mask: Path | None = None

    @property
    def training_caption(self) -> str:
        """The caption trained on: the sidecar text, else the folder prompt (kohya's fallback)."""
        if self.caption is not None:
            return self.caption
        return self.folder_prompt or ""


def parse_folder_name(name: str) -> FolderName:
    """Splits a kohya folder name into repeats and prompt.

    ``"10_ohwx dog"`` gives ``(10, "ohwx dog")``; ``"3_ohwx_dog"`` gives ``(3, "ohwx_dog")`` as
    kohya re-joins the remaining underscores. A name without a ``<digits>_`` prefix gives
    ``(None, name)``: callers decide whether a plain name means anything (the scanner says no).
    An empty prompt (``"10_"``) comes back as None.

    Args:
        name: A single folder name, not a path.
    """
    match = _KOHYA_NAME.match(name)
    if match is None:
        return FolderName(None, name.strip() or None)
    return FolderName(int(match.group(1)), match.group(2).strip() or None)


def _normalise_caption_ext(caption_ext: str) -> str:
    ext = caption_ext.strip()
    if not ext.startswith("."):
        ext = "." + ext
    if ext == "." or ext.lower() in IMAGE_EXTENSIONS:
        raise LorafitError(
            f"caption extension {caption_ext!r} is not usable; use the sidecar extension of your "
            "caption files, e.g. data.caption_ext: .txt or .caption"
        )
    return ext


def read_caption(path: Path) -> str | None:
    """Reads a caption sidecar; None when the file is absent or holds only whitespace.

    Like kohya, only the first non-blank line is the caption (kohya treats further lines as
    wildcard alternatives, which this trainer does not do). A UTF-8 byte-order mark, as Windows
    Notepad writes, is dropped rather than ending up in the prompt.
    """
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LorafitError(f"caption file {path} is not UTF-8 text; re-save it with UTF-8 encoding") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LorafitError(f"cannot read caption file {path} ({reason}); check its permissions") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def _raise_walk_error(err: OSError) -> None:
    # os.walk skips unreadable folders silently by default, which would quietly drop a concept.
    raise LorafitError(f"cannot read folder {err.filename} ({err.strerror}); check its permissions")


def _walk_files(root: Path) -> list[Path]:
    """All files under root, hidden files and folders skipped, sorted by relative path."""
    found: list[Path] = []
    visited: set[str] = set()
    # followlinks: datasets are often assembled from symlinked folders; the visited set stops
    # a link pointing at its own ancestor from looping forever.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        # Hidden entries are editor/OS debris (.ipynb_checkpoints, macOS "._x.jpg" forks),
        # never training data; the demo writer also stages its output in a hidden folder.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if not name.startswith("."))
    # os.walk order depends on the file system; training order must not.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _concept_of(directory: Path, root: Path, cache: dict[Path, FolderName | None]) -> FolderName | None:
    """Repeats and prompt of the nearest numbered folder between directory and root, if any."""
    if directory in cache:
        return cache[directory]
    concept: FolderName | None = None
    if directory != root:
        parsed = parse_folder_name(directory.name)
        if parsed.repeats is None:
            concept = _concept_of(directory.parent, root, cache)
        elif parsed.repeats < 1:
            raise LorafitError(
                f"folder {directory} asks for {parsed.repeats} repeats; use a number of at least 1 "
                "or move the folder out of data.train_dir"
            )
        else:
            concept = parsed
        cache[directory] = concept
    return concept


def _concept_dir(directory: Path) -> Path:
    """The numbered folder that gave directory its concept (called only when there is one)."""
    while parse_folder_name(directory.name).repeats is None:
        directory = directory.parent
    return directory


@dataclass(frozen=True)
class TreeScan:
    """Everything found under one dataset root, for callers that report problems instead of stopping.

    Attributes:
        root: The scanned folder.
        caption_ext: The caption extension as used, normalised (``caption`` -> ``.caption``).
        records: Images whose caption sidecar (if any) was readable, in scan order. Records with
            neither a caption nor a concept folder are included; the caller decides what to do.
        caption_errors: ``(record, message)`` for images whose sidecar exists but cannot be read;
            the record (caption None) still says which folder, repeats and prompt the image has.
        other_files: Files that are neither images nor the caption sidecar of an image (notes,
            captions without an image, sidecars with another extension), in scan order.
    """

    root: Path
    caption_ext: str
    records: list[ImageRecord]
    caption_errors: list[tuple[ImageRecord, str]]
    other_files: list[Path]

    @property
    def image_count(self) -> int:
        """Every image file found, whether or not its caption could be read."""
        return len(self.records) + len(self.caption_errors)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise LorafitError(f"dataset folder {root} does not exist; check data.train_dir")
    if not root.is_dir():
        raise LorafitError(f"data.train_dir {root} is a file; point it at the folder holding your images")


def scan_tree(root: str | os.PathLike, caption_ext: str = ".txt") -> TreeScan:
    """Lists images, unreadable captions and stray files under a kohya-style tree without stopping.

    ``lorafit prepare`` uses this to report every problem at once; :func:`scan_image_folder` turns
    the same scan into errors for training.

    Args:
        root: The folder holding the ``N_<trigger> <class>`` concept folders, or loose images.
        caption_ext: Extension of the caption sidecar files, ``.txt`` or ``.caption`` usually.

    Raises:
        LorafitError: root is missing or not a folder, caption_ext is unusable, a concept folder
            has 0 repeats, or a folder cannot be listed: problems of the tree, not of one file.
    """
    root = Path(root).expanduser()
    _check_root(root)
    ext = _normalise_caption_ext(caption_ext)
    files = _walk_files(root)
    images = [p for p in files if _is_image(p)]
    masks = find_mask_sidecars(images)  # x_mask.png beside x.jpg is x's loss mask, not an image to train
    mask_files = set(masks.values())
    images = [p for p in images if p not in mask_files]
    sidecars = {image.with_name(image.stem + ext) for image in images}
    other_files = [p for p in files if not _is_image(p) and p not in sidecars]

    cache: dict[Path, FolderName | None] = {}
    records: list[ImageRecord] = []
    caption_errors: list[tuple[ImageRecord, str]] = []
    for image in images:
        concept = _concept_of(image.parent, root, cache)
        try:
            caption, error = read_caption(image.with_name(image.stem + ext)), None
        except LorafitError as err:
            caption, error = None, str(err)
        if concept is None:
            # Outside any concept folder tag statistics are grouped by the image's own folder.
            record = ImageRecord(image, caption, 1, None, image.parent.name, masks.get(image))
        else:
            folder = _concept_dir(image.parent).name
            record = ImageRecord(image, caption, concept.repeats, concept.prompt, folder, masks.get(image))
        if error is None:
            records.append(record)
        else:
            caption_errors.append((record, error))
    return TreeScan(root, ext, records, caption_errors, other_files)


def scan_image_folder(root: str | os.PathLike, caption_ext: str = ".txt") -> list[ImageRecord]:
    """Lists every training image under a kohya-style tree with its caption and repeats.

    Args:
        root: The folder holding the ``N_<trigger> <class>`` concept folders (kohya's
            ``train_data_dir``), or loose images.
        caption_ext: Extension of the caption sidecar files, ``.txt`` or ``.caption`` usually.

    Returns:
        Records sorted by path relative to root, so every run and every rank sees the same list.

    Raises:
        LorafitError: root is missing or not a folder, holds no images, a concept folder has
            0 repeats, a caption file is unreadable, or an image has neither a caption nor a
            concept folder to take a prompt from.
    """
    root = Path(root).expanduser()
    _check_root(root)
    ext = _normalise_caption_ext(caption_ext)
    scan = scan_tree(root, ext)
    if scan.image_count == 0:
        raise LorafitError(
            f"no images found in {root} or its sub-folders (looked for {' '.join(IMAGE_EXTENSIONS)}); "
            "point data.train_dir at the folder that holds your 'N_<trigger> <class>' folders"
        )
    if scan.caption_errors:
        raise LorafitError(scan.caption_errors[0][1])
    records = scan.records
    if parse_folder_name(root.name).repeats is not None and any(r.path.parent == root for r in records):
        # kohya reads repeats from train_data_dir's sub-folders only; pointing at the concept
        # folder itself is a common slip that would silently train with 1 repeat and no prompt.
        logger.warning(
            "data.train_dir %s is itself named like a concept folder; its name is not used for "
            "repeats or prompt - point data.train_dir at its parent folder to use them",
            root,
        )

    orphans = [r for r in records if r.caption is None and r.folder_prompt is None]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise LorafitError(
            f"image {orphans[0].path} has no caption{more}: add {orphans[0].path.stem}{ext} beside it "
            "or put it in a 'N_<trigger> <class>' folder such as '10_ohwx dog'"
        )
    fallback = [r for r in records if r.caption is None]
    if fallback:
        shown = ", ".join(str(r.path.relative_to(root)) for r in fallback[:_EXAMPLES_SHOWN])
        if len(fallback) > _EXAMPLES_SHOWN:
            shown += ", ..."
        logger.warning(
            "%d of %d images have no %s caption, so their folder name was used as the caption (%s)",
            len(fallback),
            len(records),
            ext,
            shown,
        )
    return records
