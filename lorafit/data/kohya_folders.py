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

Symlinks are followed (datasets are often assembled from linked folders), but never silently out
of the tree: a link whose target lies outside the scanned folder, and a link that loops back to
its own ancestor or to a folder already read, is listed in :class:`TreeScan` for the caller to
report. A repeat count is trusted only up to :data:`MAX_REPEATS`: ``99999999999_x/`` would plan
an epoch no machine can hold.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lorafit.data.caption_files import ENCODING_NAMES, UTF8, UTF8_ENCODINGS, read_caption_file
from lorafit.data.masks import find_mask_sidecars
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

# Everything Pillow decodes that people actually put in training folders; compared lower-cased so
# "IMG_0001.JPG" from a camera counts too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif", ".gif")

# How many offending paths a warning lists before it says "...": enough to find the pattern,
# short enough to stay one readable line for a folder of a thousand uncaptioned images.
_EXAMPLES_SHOWN = 3

# A leading minus is read too, so "-3_x" is refused as a negative count instead of passing as a plain folder.
_KOHYA_NAME = re.compile(r"^(-?\d+)_(.*)$", re.DOTALL)

# The most repeats a folder may ask for. kohya guides use 1-100 (a few hundred for a single image);
# beyond this a typo or an absurd count would plan an epoch of billions of samples.
MAX_REPEATS = 10_000


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
        caption_encoding: How the caption sidecar was decoded (``utf-8`` unless it was in
            another encoding, see :mod:`lorafit.data.caption_files`).
        mask: The image's loss-mask sidecar (``<stem>_mask.png``, :mod:`lorafit.data.masks`), or None.
    """

    path: Path
    caption: str | None
    repeats: int
    folder_prompt: str | None
    folder: str
    caption_encoding: str = UTF8
    mask: Path | None = None

    @property
    def in_concept_folder(self) -> bool:
        """Whether the image lies under an ``N_...`` folder (``folder`` is then that folder's name)."""
        return parse_folder_name(self.folder).repeats is not None

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
    wildcard alternatives, which this trainer does not do). UTF-8 (with or without the byte-order
    mark Windows Notepad writes), UTF-16 and Windows-1252/Latin-1 files are decoded
    (:mod:`lorafit.data.caption_files`).
    """
    caption_file = read_caption_file(path)
    return None if caption_file is None else caption_file.caption


def no_caption_reason(record: ImageRecord, caption_ext: str) -> str:
    """Why an image without a caption sidecar has no caption to train on (its folder gives none)."""
    sidecar = record.path.stem + caption_ext
    if record.in_concept_folder:
        return (
            f"no caption: {sidecar} is missing or empty, and its folder '{record.folder}' has a repeat count but "
            f"no trigger/class after the '_' to use instead; add the caption or rename the folder like "
            f"'{record.repeats}_ohwx dog'"
        )
    hint = f" ('{record.folder}' is not one: it does not start with a repeat count)" if "_" in record.folder else ""
    return (
        f"no caption: {sidecar} is missing or empty, and the image is in no 'N_<trigger> <class>' folder{hint} "
        "to take a prompt from; add the caption or move the image into a concept folder such as '10_ohwx dog'"
    )


def _raise_walk_error(err: OSError) -> None:
    # os.walk skips unreadable folders silently by default, which would quietly drop a concept.
    raise LorafitError(f"cannot read folder {err.filename} ({err.strerror}); check its permissions")


@dataclass(frozen=True)
class LinkNote:
    """A symlink the scan met: ``path`` (inside the tree) resolves to ``target``; ``problem`` says why it is listed."""

    path: Path
    target: Path
    problem: str


def _walk_files(root: Path) -> tuple[list[Path], list[LinkNote]]:
    """All files under root (hidden files and folders skipped, sorted by relative path), and the
    symlinks that lead outside root or loop."""
    found: list[Path] = []
    notes: list[LinkNote] = []
    real_root = Path(os.path.realpath(root))
    visited: dict[str, Path] = {}
    # followlinks: datasets are often assembled from symlinked folders; the visited set stops
    # a link pointing at its own ancestor from looping forever, and such links are reported.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error, followlinks=True):
        real = Path(os.path.realpath(dirpath))
        if str(real) in visited:
            first = visited[str(real)]
            loops = first == Path(dirpath) or first in Path(dirpath).parents
            problem = "loops back to its own parent folder" if loops else f"leads to {first}, already read"
            notes.append(LinkNote(Path(dirpath), real, f"{problem}; not followed"))
            dirnames[:] = []
            continue
        visited[str(real)] = Path(dirpath)
        parent_inside = Path(os.path.realpath(Path(dirpath).parent)).is_relative_to(real_root)
        if dirpath != str(root) and not real.is_relative_to(real_root) and parent_inside:
            notes.append(LinkNote(Path(dirpath), real, "leads outside the dataset folder; followed"))
        # Hidden entries are editor/OS debris (.ipynb_checkpoints, macOS "._x.jpg" forks),
        # never training data; the demo writer also stages its output in a hidden folder.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            found.append(path)
            target = Path(os.path.realpath(path))
            if path.is_symlink() and real.is_relative_to(real_root) and not target.is_relative_to(real_root):
                notes.append(LinkNote(path, target, "leads outside the dataset folder; followed"))
    # os.walk order depends on the file system; training order must not.
    key = lambda p: p.relative_to(root).as_posix()
    return sorted(found, key=key), sorted(notes, key=lambda n: key(n.path))


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
        elif parsed.repeats > MAX_REPEATS:
            # Refused before anything is planned: an epoch of this many samples cannot be held.
            raise LorafitError(
                f"folder {directory} asks for {parsed.repeats} repeats per epoch, more than lorafit's limit of "
                f"{MAX_REPEATS}; rename it with a smaller count (kohya guides use 1-100)"
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
        links: Symlinks leading outside ``root`` (followed) or looping (not followed).
    """

    root: Path
    caption_ext: str
    records: list[ImageRecord]
    caption_errors: list[tuple[ImageRecord, str]]
    other_files: list[Path]
    links: list[LinkNote] = field(default_factory=list)

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
    files, links = _walk_files(root)
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
        caption, encoding, error = None, UTF8, None
        try:
            caption_file = read_caption_file(image.with_name(image.stem + ext))
            if caption_file is not None:
                caption, encoding = caption_file.caption, caption_file.encoding
        except LorafitError as err:
            error = str(err)
        if concept is None:
            # Outside any concept folder tag statistics are grouped by the image's own folder.
            record = ImageRecord(image, caption, 1, None, image.parent.name, encoding, masks.get(image))
        else:
            folder = _concept_dir(image.parent).name
            record = ImageRecord(image, caption, concept.repeats, concept.prompt, folder, encoding, masks.get(image))
        if error is None:
            records.append(record)
        else:
            caption_errors.append((record, error))
    return TreeScan(root, ext, records, caption_errors, other_files, links)


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
        more = f" (and {len(orphans) - 1} more images)" if len(orphans) > 1 else ""
        raise LorafitError(f"image {orphans[0].path}{more}: {no_caption_reason(orphans[0], ext)}")
    for link in scan.links:
        logger.warning("%s -> %s %s", link.path, link.target, link.problem)
    legacy = [r for r in records if r.caption is not None and r.caption_encoding not in UTF8_ENCODINGS]
    if legacy:
        logger.warning(
            "%d captions are not UTF-8 and were decoded as %s (e.g. %s); re-save them as UTF-8",
            len(legacy),
            ", ".join(sorted({ENCODING_NAMES[r.caption_encoding] for r in legacy})),
            legacy[0].path.with_name(legacy[0].path.stem + ext),
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
