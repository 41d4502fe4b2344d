"""The caption files the review page may read and write, and nothing else.

Every file the browser names arrives as ``<root number>/<path relative to that root>`` and goes
through :meth:`CaptionStore.image_path`, which refuses anything that is not an image file inside
a dataset root after resolving ``..`` and symlinks. A symlink leading out of the root is refused
too: the page is a local web server, and the files it may touch must be exactly the ones under the
folder the user named. Such images are left out of the listing and counted in a note, and so are
images whose *caption file* is a symlink leading out of the root: that file is neither read (its
text would reach the page) nor written or backed up.

Caption files are decoded as training reads them (UTF-8, UTF-16, Windows-1252; see
:mod:`lorafit.data.caption_files`), so the page shows, and the ``.bak`` keeps, the real text of a
file saved in another encoding; a save writes UTF-8.

Saving uses optimistic concurrency: the page sends the version (SHA-256 of the file bytes) it
loaded, and a file changed since (by another tab, an editor, ``lorafit caption``) is not
overwritten but answered with its current text, for the page to show.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorafit.captioning.caption import replace_caption
from lorafit.data.caption_files import decode_caption
from lorafit.data.kohya_folders import IMAGE_EXTENSIONS, scan_tree
from lorafit.errors import LorafitError

ABSENT = "absent"  # the version of a caption file that does not exist


class RefusedPath(Exception):
    """A file parameter that names nothing the page may touch; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def version_of(data: bytes | None) -> str:
    """The version string of a caption file's bytes (``absent`` when there is no file)."""
    return ABSENT if data is None else hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _decoded(data: bytes) -> str:
    try:
        return decode_caption(data, "caption").text
    except LorafitError:  # not text: shown as UTF-8 with replacement characters, as before
        return data.decode("utf-8-sig", errors="replace")


def as_text(data: bytes | None) -> str:
    """Caption file bytes as the text box shows them: decoded, BOM and trailing newlines dropped."""
    if data is None:
        return ""
    return _decoded(data).rstrip("\r\n")


@dataclass(frozen=True)
class SaveResult:
    """What happened to one save: ``saved``, ``unchanged`` or ``conflict`` (text = what is on disk)."""

    id: str
    status: str
    version: str
    text: str


class CaptionStore:
    """Reads and writes the caption sidecars of the images under one or more dataset roots.

    Args:
        roots: The dataset folders (a kohya tree, or a prepare output's source folders).
        caption_ext: Extension of the caption sidecars, ``.txt`` or ``.caption``.
    """

    def __init__(self, roots: list[Path], caption_ext: str = ".txt") -> None:
        self.roots = [root.resolve() for root in roots]
        self.caption_ext = scan_tree(self.roots[0], caption_ext).caption_ext  # normalised, validated
        # One save at a time: the version check and the write must not interleave between requests.
        self._lock = threading.Lock()

    def image_path(self, image_id: str) -> Path:
        """The image file an id names, or :class:`RefusedPath` (400/403/404) when it may not be used."""
        if not image_id or "\x00" in image_id or "\\" in image_id:
            raise RefusedPath(400, "bad file parameter")
        number, _, relative = image_id.partition("/")
        if not number.isdigit() or int(number) >= len(self.roots) or not relative:
            raise RefusedPath(400, f"file parameter {image_id!r} does not start with a dataset root number")
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
            raise RefusedPath(403, f"{image_id!r} points outside the dataset folder")
        root = self.roots[int(number)]
        resolved = (root / relative).resolve()
        if not resolved.is_relative_to(root):  # a symlink leading out of the root
            raise RefusedPath(403, f"{image_id!r} points outside the dataset folder")
        if resolved.suffix.lower() not in IMAGE_EXTENSIONS or not resolved.is_file():
            raise RefusedPath(404, f"no image {image_id!r} in the dataset")
        if not self._inside(self.sidecar(root / relative), root):
            raise RefusedPath(403, f"the caption file of {image_id!r} is a symlink leading outside the dataset folder")
        return root / relative

    def sidecar(self, image: Path) -> Path:
        return image.with_name(image.stem + self.caption_ext)

    @staticmethod
    def _inside(path: Path, root: Path) -> bool:
        """Whether ``path`` (which may be absent, or a symlink) resolves to a place under ``root``."""
        return path.resolve().is_relative_to(root)

    def items(self) -> tuple[list[dict], list[str]]:
        """Every image with its caption and version, and notes on files left out (rescanned each time)."""
        items, notes, outside = [], [], 0
        for number, root in enumerate(self.roots):
            scan = scan_tree(root, self.caption_ext)
            images = [record.path for record in scan.records] + [record.path for record, _ in scan.caption_errors]
            for image in sorted(images, key=lambda p: p.relative_to(root).as_posix()):
                if not self._inside(image, root) or not self._inside(self.sidecar(image), root):
                    outside += 1
                    continue
                relative = image.relative_to(root).as_posix()
                data = _read_bytes(self.sidecar(image))
                items.append(
                    {
                        "id": f"{number}/{relative}",
                        "root": number,
                        "path": relative,
                        "folder": image.parent.relative_to(root).as_posix(),
                        "text": as_text(data),
                        "version": version_of(data),
                    }
                )
        if outside:
            notes.append(
                f"{outside} images reached through symlinks leading outside the dataset folder (or whose caption "
                "file is such a symlink) are not shown; open their own folder with `lorafit review` to edit them"
            )
        return items, notes

    def save(self, image_id: str, text: str, version: str) -> SaveResult:
        """Writes one caption if the file is still at ``version``; keeps the previous text as ``.bak``.

        Raises:
            RefusedPath: ``image_id`` names nothing the page may touch.
        """
        sidecar = self.sidecar(self.image_path(image_id))
        text = text.replace("\r\n", "\n").rstrip("\n")
        with self._lock:
            data = _read_bytes(sidecar)
            current = version_of(data)
            if current != version:
                return SaveResult(image_id, "conflict", current, as_text(data))
            if data is not None and as_text(data) == text:
                return SaveResult(image_id, "unchanged", current, text)
            previous = _decoded(data) if data is not None else None
            replace_caption(sidecar, text, previous)
            return SaveResult(image_id, "saved", version_of(_read_bytes(sidecar)), text)
