"""Loss masks: which pixels of a training image the loss should learn from ("the subject, not the background").

A mask is an 8-bit grayscale picture the size of its image, white (255) where the loss counts
fully and black (0) where it counts only the configured floor (``model.loss.mask_floor``). It
comes from one of two places, as in kohya's ``masked_loss``/``alpha_mask`` and OneTrainer:

- a sidecar ``<image stem>_mask.png`` (any image format) beside the image, painted in any editor;
- with ``alpha_mask``, the image's own alpha channel (cut-out PNGs): opaque = subject.

``lorafit prepare`` stores it as the sample's ``mask.png`` member, upright as its image (EXIF
orientation applied to both); training resizes, crops and flips it exactly as its image
(:class:`~lorafit.data.sample_transform.SampleTransform`), and ``lorafit cache`` stores the
cropped mask beside the latents.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lorafit.errors import LorafitError

MASK_SUFFIX = "_mask"
MEMBER = "mask.png"  # the shard member holding a sample's mask
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def find_mask_sidecars(images: list[Path]) -> dict[Path, Path]:
    """``{image: its mask}`` among image files: ``x_mask.png`` (any image format) beside ``x.jpg``.

    When two images share a stem (``x.jpg`` and ``x.png``) the mask belongs to both.
    """
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for image in images:
        by_stem.setdefault((image.parent, image.stem), []).append(image)
    found = {}
    for candidate in images:
        if candidate.stem.endswith(MASK_SUFFIX):
            for image in by_stem.get((candidate.parent, candidate.stem[: -len(MASK_SUFFIX)]), []):
                found[image] = candidate
    return found


def _as_gray(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_GRAY_MODES:  # 16-bit masks: scale, as Pillow's convert would clip
        wide = np.asarray(img).astype(np.float32)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # A mask painted on a transparent layer: what is painted counts, transparent is background.
        rgba = img.convert("RGBA")
        gray = np.asarray(rgba.convert("L"), dtype=np.float32) * (np.asarray(rgba.getchannel("A")) / 255.0)
        return Image.fromarray(np.rint(gray).astype(np.uint8))
    return img.convert("L")


def read_mask(data: bytes, name: str, image_size: tuple[int, int]) -> Image.Image:
    """A mask sidecar's bytes as an upright ``L`` image of ``image_size`` (w, h).

    A mask of another size but the same aspect ratio (a mask painted on a downscaled copy) is
    resized to the image; another aspect ratio cannot belong to the image and is refused.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            img.load()
            mask = _as_gray(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise LorafitError(f"mask {name} cannot be decoded ({' '.join(str(err).split())}); re-export it") from None
    if mask.size != image_size:
        (mw, mh), (iw, ih) = mask.size, image_size
        if abs(mw / mh - iw / ih) > 0.01 * iw / ih:
            raise LorafitError(
                f"mask {name} is {mw}x{mh} but its image is {iw}x{ih}; a mask must cover its image "
                "(same size or aspect ratio)"
            )
        mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    return mask


def alpha_of(data: bytes) -> Image.Image | None:
    """The alpha channel of an image file, upright, as an ``L`` mask; None when it has no transparency."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
            return None
        img.load()
        return ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")


def png_bytes(mask: Image.Image) -> bytes:
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


def decode_member(data: bytes) -> Image.Image:
    """A sample's stored ``mask.png`` member."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("L")


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the image's resize target: box filter (the area each pixel covers) when
    shrinking, bilinear when enlarging; neither rings outside 0..255 as the image's Lanczos would."""
    if mask.size == size:
        return mask
    shrinking = size[0] < mask.width
    return mask.resize(size, Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
