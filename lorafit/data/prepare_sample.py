"""One source image -> one webdataset sample for ``lorafit prepare``, or the reason it is skipped.

Each step either produces part of the sample or raises :class:`SkipFile` with a sentence for the
report, so a bad file never stops the run. Pixels are decoded by :mod:`lorafit.data.images` (EXIF,
alpha, CMYK, 16-bit, palette, first frame) and buckets come from :mod:`lorafit.data.buckets`; this
module only decides what to store and what to say about it.

What is stored:

* the **original bytes** when the file is a JPEG, PNG or WebP that already decodes to upright RGB:
  no generation loss, no work, and the sha1 in the metadata still matches the stored image;
* otherwise a re-encoded image: **JPEG at quality 95 with 4:4:4 chroma** when the source was a JPEG
  (it is lossy already, so a near-lossless re-encode keeps the shard ~5-10x smaller than a PNG of a
  photo while 4:4:4 avoids smearing colour edges), and **PNG** for everything else (PNG, WebP, BMP,
  TIFF, GIF sources may be lossless, line art or cut-outs, where JPEG would add ringing and blocks).
  Re-encoded images carry no EXIF, so readers that apply EXIF orientation cannot rotate them twice.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.buckets import BucketChoice, Size, select_bucket
from lorafit.data.caption_files import ENCODING_NAMES, UTF8_ENCODINGS
from lorafit.data.images import Color, DecodedImage, decode_rgb_with_fixes
from lorafit.data.kohya_folders import ImageRecord, no_caption_reason
from lorafit.data.masks import alpha_of, png_bytes, read_mask
from lorafit.errors import LorafitError

# Formats a training reader decodes cheaply and everywhere; anything else is re-encoded.
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# MPO is the multi-picture JPEG some phones and 3D cameras write; its first frame is a JPEG.
_LOSSY_FORMATS = ("JPEG", "MPO")
JPEG_QUALITY = 95

# Report wording for the fix names of lorafit.data.images.DecodedImage.
_FIX_NOTES = {
    "exif_transpose": "EXIF orientation applied (pixels were stored rotated or mirrored)",
    "exif_unreadable": "EXIF data unreadable, orientation left as stored",
    "first_frame": "animated or multi-page file: first frame kept",
    "16bit_to_8bit": "16-bit image scaled to 8-bit RGB",
    "alpha_composited": "transparency composited onto {background}",
    "cmyk_to_rgb": "CMYK converted to RGB",
    "palette_to_rgb": "palette image converted to RGB",
    "gray_to_rgb": "grayscale converted to RGB",
}


class SkipFile(Exception):
    """Raised with the report's reason when a source file cannot become a sample.

    ``kind`` groups reasons for the one-line error of a run where no file was usable (see
    :data:`lorafit.data.prepare_report.SKIP_KINDS`).
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class SampleSettings:
    """What every file is prepared against (built once from ``prepare``'s arguments).

    Attributes:
        caption_ext: Normalised caption sidecar extension, for messages.
        table: kohya bucket table for the resolution settings.
        no_upscale: kohya's ``bucket_no_upscale``.
        max_area: ``resolution ** 2``.
        bucket_reso_steps: Bucket side granularity.
        smallest_side: Smallest side of any bucket; images with a shorter side are "small".
        drop_small: Skip small images instead of keeping them.
        background: RGB colour transparency is composited onto.
        background_name: The colour as the user gave it, for the report.
        size_chosen: The user set the resolution or bucket sides (a flag or a fit config): an
            image below the smallest side is then their choice, and the report words it as a note.
        alpha_mask: Use a transparent image's alpha channel as its loss mask (kohya's ``alpha_mask``).
    """

    caption_ext: str
    table: list[Size]
    no_upscale: bool
    max_area: int
    bucket_reso_steps: int
    smallest_side: int
    drop_small: bool
    background: Color
    background_name: str
    size_chosen: bool = False
    alpha_mask: bool = False


@dataclass(frozen=True)
class PreparedSample:
    """A sample ready for ``ShardWriter`` (minus its key) and what the report says about it."""

    image_ext: str
    image_bytes: bytes
    caption: str
    meta: dict
    notes: list[str]
    choice: BucketChoice
    mask: bytes | None = None  # the loss mask as an 8-bit PNG of the image's size (lorafit.data.masks)


def split_prompt(prompt: str | None, is_reg: bool) -> tuple[str | None, str | None]:
    """Subject and class from a folder prompt, following kohya's ``<identifier> <class>`` naming.

    ``"ohwx dog"`` gives ``("ohwx", "dog")``; ``"style"`` gives ``("style", None)`` (a trigger
    word alone). In a regularization folder the whole prompt is the class: ``"dog"`` gives
    ``(None, "dog")``, as reg images show the class without the identifier.
    """
    if prompt is None:
        return None, None
    if is_reg:
        return None, prompt
    subject, _, rest = prompt.partition(" ")
    return subject, rest.strip() or None


def _caption(record: ImageRecord, settings: SampleSettings) -> tuple[str, list[str]]:
    notes = []
    if record.caption_encoding not in UTF8_ENCODINGS:
        name = ENCODING_NAMES[record.caption_encoding]
        notes.append(f"caption file is not UTF-8: read as {name}; re-save it as UTF-8 to be sure of its accents")
    if record.caption is not None:
        return record.caption, notes
    sidecar = record.path.stem + settings.caption_ext
    if record.folder_prompt is None:
        raise SkipFile(no_caption_reason(record, settings.caption_ext), "no_caption")
    return record.folder_prompt, [
        *notes,
        f"no caption ({sidecar} missing or empty): used folder prompt '{record.folder_prompt}'",
    ]


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise SkipFile(f"cannot read file ({reason}); check its permissions", "unreadable") from None
    if not data:
        raise SkipFile("empty file (0 bytes); re-export or remove it", "empty")
    return data


def _bucket(width: int, height: int, settings: SampleSettings) -> BucketChoice:
    try:
        return select_bucket(
            width,
            height,
            table=settings.table,
            no_upscale=settings.no_upscale,
            max_area=settings.max_area,
            bucket_reso_steps=settings.bucket_reso_steps,
        )
    except LorafitError as err:  # bucket_no_upscale cannot fit extremely thin images
        raise SkipFile(str(err), "no_bucket") from None


def _mask(record: ImageRecord, data: bytes, size: tuple[int, int], settings: SampleSettings):
    """(PNG bytes of the loss mask, where it came from: ``file``/``alpha``), or (None, None)."""
    if record.mask is not None:
        try:
            mask_data = record.mask.read_bytes()
            return png_bytes(read_mask(mask_data, record.mask.name, size)), "file"
        except OSError as err:
            raise SkipFile(
                f"cannot read its mask {record.mask.name} ({err.strerror or type(err).__name__})", "mask"
            ) from None
        except LorafitError as err:
            raise SkipFile(str(err), "mask") from None
    if settings.alpha_mask:
        alpha = alpha_of(data)
        if alpha is not None:
            return png_bytes(alpha), "alpha"
    return None, None


def _encode(data: bytes, decoded: DecodedImage) -> tuple[str, bytes, str]:
    """(shard extension, bytes, how stored: original/jpeg/png)."""
    if not decoded.fixes and decoded.source_format in _KEPT_FORMATS:
        return _KEPT_FORMATS[decoded.source_format], data, "original"
    buffer = io.BytesIO()
    if decoded.source_format in _LOSSY_FORMATS:
        decoded.image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        return "jpg", buffer.getvalue(), "jpeg"
    decoded.image.save(buffer, "PNG")
    return "png", buffer.getvalue(), "png"


def _duplicate(sha1: str, kept: tuple[Path, str], caption: str) -> str:
    """The skip reason of an exact copy: which file was kept and, if they differ, which caption was dropped."""
    path, kept_caption = kept
    reason = f"exact duplicate of {path} (same sha1 {sha1[:12]}); kept the first copy only"
    if caption == kept_caption:
        return f"{reason} (same caption)"
    return (
        f"{reason} with its caption '{kept_caption}'; this copy's caption '{caption}' was dropped "
        "- merge it into the kept one if it matters"
    )


def prepare_file(
    record: ImageRecord, root: Path, is_reg: bool, settings: SampleSettings, seen: dict[str, tuple[Path, str]]
) -> PreparedSample:
    """Turns one scanned image into a sample.

    Args:
        record: The image as the folder scan found it.
        root: The SRC or ``--reg`` folder it was found under.
        is_reg: Whether root is a regularization folder.
        settings: Shared settings.
        seen: sha1 -> (path, caption) of every sample accepted so far; a returned sample adds
            itself. Only accepted samples count, so a copy of a corrupt file is reported as
            corrupt, not as a duplicate of a file that was itself skipped.

    Raises:
        SkipFile: with the reason, for a file that must not become a sample.
    """
    caption, notes = _caption(record, settings)
    data = _read(record.path)
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 in seen:
        raise SkipFile(_duplicate(sha1, seen[sha1], caption), "duplicate")
    try:
        # The report line already shows the full path; the file name keeps the reason readable.
        decoded = decode_rgb_with_fixes(io.BytesIO(data), record.path.name, settings.background)
    except LorafitError as err:
        raise SkipFile(str(err), "undecodable") from None

    width, height = decoded.image.size
    small = min(width, height) < settings.smallest_side
    too_small = f"{width}x{height} is smaller than the smallest bucket side ({settings.smallest_side} px)"
    if small and settings.drop_small:
        raise SkipFile(f"{too_small}; dropped because drop_small is set", "small")
    choice = _bucket(width, height, settings)
    mask, mask_source = _mask(record, data, (width, height), settings)
    image_ext, image_bytes, stored = _encode(data, decoded)

    notes = [
        _FIX_NOTES.get(fix, fix.replace("_", " ")).format(background=settings.background_name) for fix in decoded.fixes
    ] + notes
    if stored != "original":
        how = f"JPEG q{JPEG_QUALITY}" if stored == "jpeg" else "PNG"
        notes.append(f"stored re-encoded as {how} (source {decoded.source_format})")
    if small and settings.size_chosen:
        notes.append(f"note: {width}x{height} is below the smallest bucket side you chose; training upscales it")
    elif small:
        notes.append(
            f"{too_small} of prepare's default settings: kept, training will upscale it (pass --fit_config with "
            "your fit config, or --resolution/--min_bucket_reso, to prepare for your size; drop_small drops it)"
        )

    subject, class_ = split_prompt(record.folder_prompt, is_reg)
    fixes = decoded.fixes + (["caption_from_folder"] if record.caption is None else [])
    meta = {
        "w": width,
        "h": height,
        "repeats": record.repeats,
        "subject": subject,
        "class": class_,
        "is_reg": is_reg,
        "folder": record.folder,
        "folder_prompt": record.folder_prompt,
        "caption_source": "sidecar" if record.caption is not None else "folder",
        "source": os.path.abspath(record.path),
        "relpath": record.path.relative_to(root).as_posix(),
        "sha1": sha1,
        "source_format": decoded.source_format,
        "stored": stored,
        "fixes": fixes,
        "small": small,
        "bucket": list(choice.bucket),
        "bucket_resized": list(choice.resized_size),
        "aspect_error": round(choice.aspect_error, 6),
        "mask": mask_source,
    }
    seen[sha1] = (record.path, caption)
    return PreparedSample(image_ext, image_bytes, caption, meta, notes, choice, mask)
