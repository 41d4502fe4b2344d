"""Aspect-ratio bucketing that reproduces kohya sd-scripts' bucket tables and assignments.

Users arrive with kohya configs (``resolution``, ``min_bucket_reso``, ``max_bucket_reso``,
``bucket_reso_steps``, ``bucket_no_upscale``) and expect the same buckets, the same image-to-bucket
assignments and the same resize sizes, so these functions follow kohya's ``BucketManager`` and
``model_util.make_bucket_resolutions`` rule for rule, including float comparisons and ``int(x + 0.5)``
rounding. Where we deliberately differ (a crash or an unusable bucket in kohya, and the SDXL crop
coordinates) the comment says so. Everything here is pure: sizes in, sizes out, no images, no torch.

Sizes are ``(width, height)`` tuples unless a name says otherwise; the SDXL micro-conditioning fields
use diffusers' height-first order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from lorafit.errors import LorafitError

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height) in pixels

# kohya's trainers check ``bucket_reso_steps % N == 0`` with N = 64 for SD1/SD2 (train_network.py,
# train_db.py) and 32 for SDXL (sdxl_train_network.py): pixel sides must survive the VAE's /8 and the
# UNet's three (SD1/2) or two (SDXL) stride-2 downsamplings without remainders.
STEP_MULTIPLE_BY_FAMILY: dict[str, int] = {"sd1": 64, "sd2": 64, "sdxl": 32}


def verify_bucket_reso_steps(bucket_reso_steps: int, family: str) -> None:
    """Rejects a ``bucket_reso_steps`` the model family's UNet cannot take, as kohya's trainers do.

    Args:
        bucket_reso_steps: Bucket side granularity in pixels.
        family: ``sd1``, ``sd2`` or ``sdxl``.

    Raises:
        LorafitError: If the family is unknown or the step is not a multiple of its requirement.
    """
    if family not in STEP_MULTIPLE_BY_FAMILY:
        known = ", ".join(STEP_MULTIPLE_BY_FAMILY)
        raise LorafitError(f"unknown model family {family!r}; expected one of {known}")
    multiple = STEP_MULTIPLE_BY_FAMILY[family]
    if bucket_reso_steps % multiple != 0:
        raise LorafitError(f"bucket_reso_steps must be a multiple of {multiple} for {family}; got {bucket_reso_steps}")


def _check_steps(bucket_reso_steps: int) -> None:
    # kohya only *recommends* multiples of 8, but a side that is not a multiple of 8 has no exact latent
    # size (the VAE downsamples by 8), so here it is an error rather than a warning.
    if not isinstance(bucket_reso_steps, int) or bucket_reso_steps <= 0 or bucket_reso_steps % 8 != 0:
        raise LorafitError(f"bucket_reso_steps must be a positive multiple of 8; got {bucket_reso_steps!r}")


def _resolution_pair(resolution: int | tuple[int, int]) -> Size:
    pair = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(pair) != 2 or not all(isinstance(x, int) and x > 0 and x % 8 == 0 for x in pair):
        raise LorafitError(
            f"resolution must be a positive multiple of 8 or a (width, height) pair of them; got {resolution!r}"
        )
    return pair  # type: ignore[return-value]


def make_bucket_table(
    resolution: int | tuple[int, int],
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
) -> list[Size]:
    """Builds kohya's predefined bucket table.

    Same rule as kohya's ``make_bucket_resolutions``: the square bucket (``sqrt(max_area)`` rounded
    down to steps), then for every width from ``min_bucket_reso`` to ``max_bucket_reso`` in steps the
    tallest height (a multiple of steps, capped at ``max_bucket_reso``) with ``w * h <= max_area``,
    together with its transpose. Kohya's defaults are ``max_bucket_reso`` 1024 for SD1/SD2 and 2048 for
    SDXL; pass whichever the config says.

    Args:
        resolution: Training resolution, a side or ``(width, height)``; ``max_area`` is their product.
        min_bucket_reso: Smallest bucket side. Rounded down to steps with a warning, as kohya does.
        max_bucket_reso: Largest bucket side. Rounded up to steps with a warning, as kohya does.
        bucket_reso_steps: Granularity of bucket sides in pixels (a multiple of 8; 64 is usual).

    Returns:
        Deduplicated ``(width, height)`` buckets sorted as tuples, exactly kohya's order (which matters:
        it breaks ties in :func:`assign_bucket`).

    Raises:
        LorafitError: On a bad step, resolution, or min/max range.
    """
    _check_steps(bucket_reso_steps)
    width, height = _resolution_pair(resolution)
    for name, value in (("min_bucket_reso", min_bucket_reso), ("max_bucket_reso", max_bucket_reso)):
        if not isinstance(value, int) or value <= 0:
            raise LorafitError(f"{name} must be a positive integer; got {value!r}")
    # kohya (adjust_min_max_bucket_reso_by_steps) adjusts rather than rejects: min down, max up. Unlike
    # kohya we never round min down to 0, which would divide by zero below.
    if min_bucket_reso % bucket_reso_steps:
        adjusted = max(bucket_reso_steps, min_bucket_reso - min_bucket_reso % bucket_reso_steps)
        logger.warning("min_bucket_reso %d is not a multiple of steps; using %d", min_bucket_reso, adjusted)
        min_bucket_reso = adjusted
    if max_bucket_reso % bucket_reso_steps:
        adjusted = max_bucket_reso + bucket_reso_steps - max_bucket_reso % bucket_reso_steps
        logger.warning("max_bucket_reso %d is not a multiple of steps; using %d", max_bucket_reso, adjusted)
        max_bucket_reso = adjusted
    if min_bucket_reso > max_bucket_reso:
        raise LorafitError(
            f"min_bucket_reso must not exceed max_bucket_reso; got {min_bucket_reso} > {max_bucket_reso}"
        )
    if min(width, height) < min_bucket_reso:
        raise LorafitError(f"min_bucket_reso must be <= resolution {width}x{height}; got {min_bucket_reso}")
    if max(width, height) > max_bucket_reso:
        raise LorafitError(f"max_bucket_reso must be >= resolution {width}x{height}; got {max_bucket_reso}")

    max_area = width * height
    # Integer arithmetic throughout, as kohya's (int(math.sqrt(...)) // steps, max_area // w // steps).
    side = int(math.sqrt(max_area) // bucket_reso_steps) * bucket_reso_steps
    buckets = {(side, side)}
    for w in range(min_bucket_reso, max_bucket_reso + 1, bucket_reso_steps):
        h = min(max_bucket_reso, (max_area // w) // bucket_reso_steps * bucket_reso_steps)
        if h >= min_bucket_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def aspect_error(width: int, height: int, bucket: Size) -> float:
    """Kohya's signed aspect-ratio error ``bucket_w / bucket_h - width / height``."""
    return bucket[0] / bucket[1] - width / height


def _check_image(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive; got {width}x{height}")


def assign_bucket(width: int, height: int, table: list[Size]) -> Size:
    """Picks the bucket whose aspect ratio is nearest the image's, as kohya's ``select_bucket`` does.

    Kohya minimises the absolute difference of ``w / h`` (not of log ratios) and takes the first
    minimum in table order (``numpy.argmin``); an image whose exact size is a bucket gets that bucket.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        table: Buckets from :func:`make_bucket_table` (or any non-empty list of sizes).

    Returns:
        The chosen ``(width, height)`` bucket.
    """
    _check_image(width, height)
    if not table:
        raise ValueError("bucket table is empty")
    if (width, height) in table:
        return (width, height)
    ratio = width / height
    best, best_err = table[0], math.inf
    for bucket in table:
        err = abs(bucket[0] / bucket[1] - ratio)
        if err < best_err:  # strict: keeps the first of equal errors, like argmin
            best, best_err = bucket, err
    return best


def _round_to_steps(x: float, steps: int) -> int:
    # kohya's BucketManager.round_to_steps: round half up to an integer, then *down* to steps.
    n = int(x + 0.5)
    return n - n % steps


def _no_upscale_resize(width: int, height: int, max_area: int, steps: int) -> Size:
    """Kohya's resize target under ``bucket_no_upscale``: the image itself, or shrunk to ``max_area``."""
    if width * height <= max_area:
        return (width, height)
    ratio = width / height
    resized_w = math.sqrt(max_area * ratio)
    resized_h = max_area / resized_w
    # Kohya rounds either the width or the height to steps, derives the other side from the aspect
    # ratio, and keeps whichever candidate distorts the aspect ratio less.
    w_rounded = _round_to_steps(resized_w, steps)
    h_in_w = _round_to_steps(w_rounded / ratio, steps)
    h_rounded = _round_to_steps(resized_h, steps)
    w_in_h = _round_to_steps(h_rounded * ratio, steps)
    # Deviation: kohya divides by zero here for images more extreme than max_area / steps**2 : 1; a
    # zero-side candidate simply loses (and is rejected below if both do).
    err_w = abs(w_rounded / h_in_w - ratio) if h_in_w else math.inf
    err_h = abs(w_in_h / h_rounded - ratio) if h_rounded else math.inf
    if err_w < err_h:
        size = (w_rounded, int(w_rounded / ratio + 0.5))
    else:
        size = (int(h_rounded * ratio + 0.5), h_rounded)
    # Deviation: rounding half up can push a side past a step boundary, so with small steps (8, or
    # 32 at extreme aspect ratios; never seen with 64) kohya's bucket can exceed max_area slightly.
    # Then we floor the exact max-area size instead, which keeps the bucket within max_area and the
    # crop under one step.
    if (size[0] - size[0] % steps) * (size[1] - size[1] % steps) > max_area:
        size = (int(resized_w), int(resized_h))
    return size


def no_upscale_bucket(width: int, height: int, max_area: int, bucket_reso_steps: int = 64) -> Size:
    """Kohya's ``bucket_no_upscale`` bucket: the image's own size (shrunk to ``max_area`` if larger)
    rounded down to steps, so the image is never enlarged and only a sliver (< one step) is cropped.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        max_area: ``resolution`` squared (or width times height).
        bucket_reso_steps: Granularity of bucket sides.

    Returns:
        The image's own ``(width, height)`` bucket, no larger than the image on either side.
        A side that would be under one step (kohya makes a zero-size bucket) raises ``LorafitError``.
    """
    _check_steps(bucket_reso_steps)
    _check_image(width, height)
    rw, rh = _no_upscale_resize(width, height, max_area, bucket_reso_steps)
    bucket = (rw - rw % bucket_reso_steps, rh - rh % bucket_reso_steps)
    if 0 in bucket:
        raise LorafitError(
            f"bucket_no_upscale: a {width}x{height} image leaves a side under bucket_reso_steps "
            f"({bucket_reso_steps}) at max area {max_area}; remove or pad the image, "
            "or turn bucket_no_upscale off"
        )
    return bucket


@dataclass(frozen=True)
class BucketChoice:
    """Where an image goes: its bucket, kohya's resize target, and the signed aspect-ratio error."""

    bucket: Size
    resized_size: Size
    aspect_error: float


def select_bucket(
    width: int,
    height: int,
    *,
    table: list[Size] | None = None,
    no_upscale: bool = False,
    max_area: int | None = None,
    bucket_reso_steps: int = 64,
) -> BucketChoice:
    """Both of kohya's modes in one call: table assignment, or a per-image bucket without upscaling.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        table: Bucket table; required unless ``no_upscale``.
        no_upscale: Kohya's ``bucket_no_upscale`` (``min/max_bucket_reso`` are then ignored, as in kohya).
        max_area: Required with ``no_upscale``: ``resolution`` squared.
        bucket_reso_steps: Step used with ``no_upscale``.

    Returns:
        A :class:`BucketChoice`; pass its ``resized_size`` on to :func:`~lorafit.data.resize_crop.plan_resize_crop`.
    """
    if no_upscale:
        if max_area is None:
            raise ValueError("select_bucket(no_upscale=True) needs max_area")
        bucket = no_upscale_bucket(width, height, max_area, bucket_reso_steps)
        # Kohya does not resize at all below max_area: the bucket is cut straight out of the image.
        resized = _no_upscale_resize(width, height, max_area, bucket_reso_steps)
    else:
        if table is None:
            raise ValueError("select_bucket needs a table unless no_upscale=True")
        bucket = assign_bucket(width, height, table)
        resized = cover_size(width, height, bucket)
    return BucketChoice(bucket, resized, aspect_error(width, height, bucket))


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The smallest aspect-preserving resize that covers ``bucket``, rounded as kohya rounds it."""
    _check_image(width, height)
    # Same float expressions as kohya's select_bucket so that ties and .5 roundings agree.
    if width / height > bucket[0] / bucket[1]:  # image wider than bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return (int(width * scale + 0.5), int(height * scale + 0.5))


def bucket_histogram(assignments: Iterable[Size]) -> dict[Size, int]:
    """Counts images per bucket, sorted by bucket, for the prepare report."""
    return dict(sorted(Counter(assignments).items()))


@dataclass(frozen=True)
class BucketStats:
    """Bucket counts and kohya's ``mean_img_ar_error`` (mean absolute aspect error) for a dataset."""

    counts: dict[Size, int]
    mean_aspect_error: float

    @classmethod
    def from_choices(cls, choices: Iterable[BucketChoice]) -> BucketStats:
        """Summarises :func:`select_bucket` results (one per image, without repeats, as kohya logs)."""
        choices = list(choices)
        mean = sum(abs(c.aspect_error) for c in choices) / len(choices) if choices else 0.0
        return cls(bucket_histogram(c.bucket for c in choices), mean)

    def lines(self) -> list[str]:
        """Human-readable report lines, e.g. ``bucket 832x1216: 12 images``."""
        out = [f"bucket {w}x{h}: {n} image{'s' if n != 1 else ''}" for (w, h), n in self.counts.items()]
        out.append(f"mean aspect-ratio error: {self.mean_aspect_error:.4f}")
        return out
