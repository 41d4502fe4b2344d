"""kohya's resize-then-trim of one image into its bucket, with the SDXL micro-conditioning it implies.

Pure, like :mod:`lorafit.data.buckets` (which picks the bucket): sizes in, a plan out, no images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from lorafit.data.buckets import Size, cover_size
from lorafit.errors import LorafitError


@dataclass(frozen=True)
class ResizeCrop:
    """How to turn one image into one bucket-sized training image, plus SDXL micro-conditioning.

    Attributes:
        resized_size: ``(width, height)`` to resize the image to first.
        left: Crop offset from the left of the resized image.
        top: Crop offset from the top of the resized image.
        bucket_size: ``(width, height)`` of the crop, i.e. the bucket.
        original_size: ``(height, width)`` of the image before resizing (SDXL ``original_size``).
        crop_top_left: ``(top, left)`` (SDXL ``crops_coords_top_left``).
        target_size: ``(height, width)`` of the bucket (SDXL ``target_size``).
    """

    resized_size: Size
    left: int
    top: int
    bucket_size: Size
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` in the resized image, as ``PIL.Image.crop`` takes it."""
        return (self.left, self.top, self.left + self.bucket_size[0], self.top + self.bucket_size[1])

    @property
    def flipped_crop_top_left(self) -> tuple[int, int]:
        """``crop_top_left`` after a horizontal flip of the cropped image (left measured from the right)."""
        return (self.top, self.resized_size[0] - self.left - self.bucket_size[0])

    @property
    def add_time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's six ``add_time_ids``: original_size + crops_coords_top_left + target_size."""
        return self.original_size + self.crop_top_left + self.target_size


def plan_resize_crop(
    image_w: int,
    image_h: int,
    bucket_w: int,
    bucket_h: int,
    crop: Literal["center", "random"] = "center",
    rng: random.Random | None = None,
    resized_size: Size | None = None,
) -> ResizeCrop:
    """Plans kohya's ``trim_and_resize_if_required``: resize to cover the bucket, then trim the excess.

    The crop position follows kohya (``excess // 2`` when centred, ``randint(0, excess)`` when random).
    The SDXL fields record the crop actually taken, in the resized image, as diffusers' SDXL training
    scripts and the SDXL paper define them. Kohya instead records ``get_crop_ltrb``, the offsets of the
    image letterboxed *inside* the bucket, which is on the other axis (kohya-ss/sd-scripts#1443).

    Args:
        image_w: Image width in pixels.
        image_h: Image height in pixels.
        bucket_w: Bucket width.
        bucket_h: Bucket height.
        crop: ``center`` or ``random``.
        rng: Generator for random crops; defaults to the ``random`` module, which Lightning's
            ``seed_everything`` seeds (kohya uses it too).
        resized_size: Resize target from :func:`select_bucket` (needed for ``bucket_no_upscale``,
            where kohya does not resize small images); defaults to :func:`cover_size`.

    Returns:
        The :class:`ResizeCrop` plan.
    """
    if crop not in ("center", "random"):
        raise LorafitError(f"crop must be 'center' or 'random'; got {crop!r}")
    rw, rh = resized_size if resized_size is not None else cover_size(image_w, image_h, (bucket_w, bucket_h))
    if rw < bucket_w or rh < bucket_h:
        raise ValueError(f"resized size {rw}x{rh} does not cover bucket {bucket_w}x{bucket_h}")
    rand = rng if rng is not None else random
    # Width first, and no draw without excess, so a seeded run consumes randomness as kohya's does.
    left, top = (
        rand.randint(0, excess) if crop == "random" and excess else excess // 2
        for excess in (rw - bucket_w, rh - bucket_h)
    )
    return ResizeCrop(
        (rw, rh),
        left,
        top,
        (bucket_w, bucket_h),
        original_size=(image_h, image_w),
        crop_top_left=(top, left),
        target_size=(bucket_h, bucket_w),
    )
