"""Decoding any image a user drops in a training folder into upright 8-bit RGB, and square crops.

Training folders are assembled from phones, screenshots, scans and web downloads, so "open it and
call ``.convert("RGB")``" is wrong in several quiet ways this module fixes:

* phone photos store pixels sideways plus an EXIF orientation tag; without applying it the model
  learns rotated subjects (kohya users meet this as "my LoRA makes sideways faces");
* transparent PNGs converted naively turn their transparent areas black (or whatever colour the
  hidden pixels hold), teaching dark halos around cut-out subjects;
* 16-bit grayscale PNGs are *clipped*, not scaled, by Pillow's convert, so they come out white;
* animated GIFs / WebPs must give one defined frame, the first.

No torchvision here (it is not a dependency): PIL does the resampling, numpy hands pixels to torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lorafit.errors import LorafitError

if TYPE_CHECKING:  # torch is imported where used: `lorafit caption` decodes images and never needs it
    import torch

logger = logging.getLogger("lorafit.data")

Color = tuple[int, int, int]

# Pillow's names for 16/32-bit single-channel data, whose values span 0..65535 rather than 0..255.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_MODE_FIXES = {"CMYK": "cmyk_to_rgb", "P": "palette_to_rgb", "L": "gray_to_rgb", "1": "gray_to_rgb"}
_EXIF_ORIENTATION = 0x0112


def to_rgb(img: Image.Image, background: Color = (255, 255, 255), name: str = "image") -> Image.Image:
    """Converts a decoded image of any Pillow mode to 8-bit RGB.

    Args:
        img: A loaded image (any mode).
        background: Colour that transparent pixels are composited onto.
        name: Shown in the error when the mode cannot be converted.
    """
    return _to_rgb(img, background, name)[0]


def _to_rgb(img: Image.Image, background: Color, name: str) -> tuple[Image.Image, str | None]:
    """``to_rgb`` plus the name of the conversion it made (None for RGB), for ``lorafit prepare``."""
    if img.mode == "RGB":
        return img, None
    if img.mode in _WIDE_GRAY_MODES:
        # Scale 0..65535 down to 0..255; Pillow's own convert would clip everything above 255.
        wide = np.asarray(img).astype(np.float32)
        narrow = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow).convert("RGB"), "16bit_to_8bit"
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Palette/gray/RGB images can carry transparency as a tRNS entry instead of an alpha
        # band; convert("RGBA") turns either form into real alpha before compositing.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), "alpha_composited"
    try:
        # CMYK (Pillow undoes Adobe's inverted CMYK JPEGs while decoding), L, 1, P, YCbCr, F.
        converted = img.convert("RGB")
    except ValueError:
        raise LorafitError(
            f"{name} uses colour mode {img.mode}, which cannot be converted to RGB; re-save it as an RGB PNG or JPEG"
        ) from None
    return converted, _MODE_FIXES.get(img.mode, f"{img.mode.lower()}_to_rgb")


def _upright(img: Image.Image, name: str) -> tuple[Image.Image, str | None]:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        upright = ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - malformed EXIF raises many types; pixels are still fine
        logger.warning("ignoring unreadable EXIF orientation of %s (%s)", name, err)
        return img.copy(), "exif_unreadable"
    # Orientation 1 is "already upright"; values outside 2..8 are invalid and Pillow ignores them.
    return upright, ("exif_transpose" if orientation in range(2, 9) else None)


def _draft(img: Image.Image, upright_size: tuple[int, int]) -> None:
    # The draft size is in stored (pre-EXIF) orientation: swap for the rotating orientations 5-8.
    try:
        rotated = img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - unreadable EXIF: _upright reports it; draft as stored
        rotated = False
    width, height = upright_size
    img.draft(img.mode, (height, width) if rotated else (width, height))  # scale only, keep the mode


class DecodedImage(NamedTuple):
    """An upright RGB image and what it took to get there.

    Attributes:
        image: Upright 8-bit RGB pixels.
        source_format: Pillow's name of the file format (``JPEG``, ``PNG``, ``WEBP``, ``GIF``...).
        fixes: Corrections applied, in order, as stable names: ``exif_transpose``,
            ``exif_unreadable``, ``first_frame``, ``16bit_to_8bit``, ``alpha_composited``,
            ``cmyk_to_rgb``, ``palette_to_rgb``, ``gray_to_rgb`` or ``<mode>_to_rgb``. Empty when
            the file already decodes to upright RGB as stored.
    """

    image: Image.Image
    source_format: str | None
    fixes: list[str]


def decode_rgb_with_fixes(
    fp: IO[bytes], name: str, background: Color = (255, 255, 255), draft_size: tuple[int, int] | None = None
) -> DecodedImage:
    """Like :func:`decode_rgb`, and also says which corrections were needed.

    ``lorafit prepare`` stores a file's original bytes only when ``fixes`` is empty, and lists
    the fixes in its report.

    Args:
        fp: Binary file object positioned at the start of the image.
        name: Path or key shown in error messages.
        background: Colour that transparent pixels are composited onto.
        draft_size: Upright ``(width, height)`` the caller will resize to. A JPEG is then decoded
            at the smallest 1/2, 1/4 or 1/8 DCT scale still at least that large: a 4000 px photo
            for a 1024 px bucket decodes about 4x faster and the resize has less to do, with the
            same result after the final high-quality resize.

    Raises:
        LorafitError: the data is not an image Pillow reads, or is truncated/corrupt.
    """
    try:
        with Image.open(fp) as img:
            source_format = img.format
            # Asked before decoding: on a loaded GIF the check would seek away from frame 0.
            animated = getattr(img, "is_animated", False)
            img.seek(0)  # first frame of animated GIF/WebP/APNG and first page of a TIFF
            if draft_size is not None and img.format == "JPEG":
                _draft(img, draft_size)
            # Decode now, inside the try: Pillow is lazy and would otherwise report a truncated
            # file much later, far from the file name.
            img.load()
            upright, exif_fix = _upright(img, name)
            rgb, mode_fix = _to_rgb(upright, background, name)
    except UnidentifiedImageError:
        raise LorafitError(
            f"{name} is not an image format Pillow can read; convert it to PNG or JPEG or remove it"
        ) from None
    except Image.DecompressionBombError as err:
        raise LorafitError(f"{name} is too large to decode safely ({err}); downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise LorafitError(
            f"cannot decode image {name} ({reason}); it is truncated or corrupt - re-export or remove it"
        ) from None
    fixes = [fix for fix in (exif_fix, "first_frame" if animated else None, mode_fix) if fix]
    return DecodedImage(rgb, source_format, fixes)


def decode_rgb(fp: IO[bytes], name: str, background: Color = (255, 255, 255)) -> Image.Image:
    """Decodes an open binary file (or ``io.BytesIO`` of a shard member) to upright RGB.

    Args:
        fp: Binary file object positioned at the start of the image.
        name: Path or key shown in error messages.
        background: Colour that transparent pixels are composited onto.

    Raises:
        LorafitError: the data is not an image Pillow reads, or is truncated/corrupt.
    """
    return decode_rgb_with_fixes(fp, name, background).image


def load_rgb(path: str | os.PathLike, background: Color = (255, 255, 255)) -> Image.Image:
    """Loads an image file as upright 8-bit RGB.

    Applies the EXIF orientation, composites transparency onto ``background``, scales 16-bit
    gray to 8 bits, converts CMYK/gray/palette to RGB and takes the first frame of animations.

    Args:
        path: The image file.
        background: Colour that transparent pixels are composited onto (white by default, as
            most cut-out product and character images are meant to be seen).

    Raises:
        LorafitError: the file is missing, unreadable, not an image, or truncated/corrupt.
    """
    path = Path(path)
    try:
        fp = path.open("rb")
    except OSError as err:
        raise LorafitError(f"cannot open image {path} ({err.strerror}); check that it exists and is readable") from None
    with fp:
        return decode_rgb(fp, str(path), background)


def resize_center_crop(img: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resizes the short side to ``size`` and takes the central ``size`` x ``size`` square.

    The geometry follows diffusers' SDXL training example so the SDXL micro-conditioning
    (``add_time_ids``) means what the base model was trained with: ``original_size`` is the
    image before resizing, and ``crop_top_left`` is the crop offset in the *resized* image.

    Args:
        img: An RGB image (as from ``load_rgb``).
        size: Side of the square output in pixels.

    Returns:
        ``(pixels, original_size, crop_top_left)``: a float tensor ``[3, size, size]`` in
        ``[-1, 1]`` (the VAE's input range), ``(height, width)`` of ``img`` and ``(top, left)``.
    """
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    width, height = img.size
    # Integer rule of torchvision's Resize(int), which the diffusers example uses: the long
    # side is truncated, never rounded, so offsets match images prepared with that code.
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        # Lanczos keeps detail when shrinking; when enlarging it rings, bicubic does not.
        shrinking = new_w < width
        resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample=resample)
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))

    import torch

    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return tensor, (height, width), (top, left)
