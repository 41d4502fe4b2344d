"""Tests for lorafit.data.buckets: kohya-exact tables and assignments, plus invariants over sweeps.

The literal tables and assignments below were produced by running kohya-ss/sd-scripts'
``model_util.make_bucket_resolutions`` and ``train_util.BucketManager.select_bucket`` (commit 48d368fa)
on the same inputs. The invariant tests sweep thousands of seeded random image sizes instead of using
hypothesis (not a dependency of this project); seeds are fixed so failures reproduce.
"""

from __future__ import annotations

import logging
import math
import random

import pytest

from lorafit.data.buckets import (
    BucketChoice,
    BucketStats,
    assign_bucket,
    bucket_histogram,
    cover_size,
    make_bucket_table,
    no_upscale_bucket,
    select_bucket,
    verify_bucket_reso_steps,
)
from lorafit.data.resize_crop import plan_resize_crop
from lorafit.errors import LorafitError

KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]  # fmt: skip
KOHYA_SDXL_1024 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984),
    (512, 2048), (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408),
    (704, 1472), (768, 1280), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512),
    (1984, 512), (2048, 256), (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]  # fmt: skip
KOHYA_768 = [
    (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024),
    (640, 896), (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320),
    (1024, 384), (1024, 448), (1024, 512), (1024, 576),
]  # fmt: skip

# (image, table bucket, table resized, no_upscale bucket, no_upscale resized) from kohya, steps 64.
KOHYA_SELECT_512 = [
    ((1920, 1080), (640, 384), (683, 384), (640, 384), (683, 384)),
    ((1080, 1920), (384, 640), (384, 683), (384, 640), (384, 683)),
    ((3000, 2000), (640, 384), (640, 427), (576, 384), (576, 384)),
    ((800, 600), (576, 448), (597, 448), (512, 384), (512, 384)),
    ((1000, 1000), (512, 512), (512, 512), (512, 512), (512, 512)),
    ((512, 768), (384, 640), (427, 640), (384, 576), (384, 576)),
    ((2048, 512), (1024, 256), (1024, 256), (1024, 256), (1024, 256)),
    ((5000, 700), (1024, 256), (1829, 256), (1344, 192), (1371, 192)),
    ((833, 1217), (384, 640), (438, 640), (384, 576), (394, 576)),
    ((300, 2000), (256, 1024), (256, 1707), (192, 1280), (192, 1280)),
]
KOHYA_SELECT_SDXL = [
    ((1920, 1080), (1344, 768), (1365, 768), (1344, 768), (1365, 768)),
    ((3000, 2000), (1216, 832), (1248, 832), (1216, 832), (1248, 832)),
    ((800, 600), (1152, 896), (1195, 896), (768, 576), (800, 600)),
    ((4032, 3024), (1152, 896), (1195, 896), (1088, 832), (1109, 832)),
    ((1000, 1000), (1024, 1024), (1024, 1024), (960, 960), (1000, 1000)),
    ((512, 768), (832, 1216), (832, 1248), (512, 768), (512, 768)),
    ((5000, 700), (2048, 320), (2286, 320), (2240, 320), (2286, 320)),
    ((833, 1217), (832, 1216), (832, 1216), (832, 1216), (833, 1217)),
    ((300, 2000), (320, 2048), (320, 2133), (256, 1984), (300, 2000)),
]

# (resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps) swept by the invariant tests.
CONFIGS = [
    (512, 256, 1024, 64),
    (768, 256, 1024, 64),
    (1024, 256, 2048, 64),
    ((1024, 768), 256, 1536, 64),
    (1024, 512, 2048, 32),
    (512, 128, 1024, 32),
    (640, 320, 960, 64),
    (520, 256, 1024, 8),
]


def _random_sizes(seed: int, n: int = 3000, lo: int = 64, hi: int = 6000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        w = rng.randint(lo, hi)
        # Half the draws by aspect ratio so portrait, landscape and extreme shapes are all common.
        h = rng.randint(lo, hi) if rng.random() < 0.5 else max(lo, int(w / rng.uniform(0.15, 6.0)))
        sizes.append((w, h))
    return sizes


def test_tables_match_kohya_exactly():
    assert make_bucket_table(512, 256, 1024, 64) == KOHYA_512
    assert make_bucket_table(1024, 256, 2048, 64) == KOHYA_SDXL_1024
    assert make_bucket_table(768, 256, 1024, 64) == KOHYA_768
    assert make_bucket_table((512, 512)) == KOHYA_512  # defaults are kohya's SD1 defaults


def test_well_known_sdxl_buckets_present():
    table = make_bucket_table(1024, 256, 2048, 64)
    for bucket in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                   (768, 1344), (1536, 640), (640, 1536)]:  # fmt: skip
        assert bucket in table


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_table_invariants(config):
    resolution, lo, hi, steps = config
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    table = make_bucket_table(resolution, lo, hi, steps)
    assert table == sorted(set(table))
    square = int(math.sqrt(w * h)) // steps * steps
    assert (square, square) in table
    for bw, bh in table:
        assert bw * bh <= w * h
        assert bw % steps == 0 and bh % steps == 0
        assert lo <= bw <= hi and lo <= bh <= hi
        assert (bh, bw) in table


def test_min_max_adjusted_to_steps_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lorafit.data.buckets"):
        table = make_bucket_table(512, 300, 1000, 64)
    assert table == make_bucket_table(512, 256, 1024, 64)
    assert "min_bucket_reso 300" in caplog.text and "max_bucket_reso 1000" in caplog.text
    # kohya would round a min below one step down to 0 and divide by zero; we stop at one step.
    assert min(min(b) for b in make_bucket_table(512, 30, 1024, 64)) == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bucket_reso_steps": 60}, "bucket_reso_steps must be a positive multiple of 8; got 60"),
        ({"bucket_reso_steps": 0}, "bucket_reso_steps"),
        ({"resolution": 500}, "resolution must be a positive multiple of 8"),
        ({"resolution": (512, 512, 3)}, "resolution"),
        ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "must not exceed max_bucket_reso; got 1024"),
        ({"min_bucket_reso": 640}, "min_bucket_reso must be <= resolution"),
        ({"resolution": 1024, "max_bucket_reso": 768}, "max_bucket_reso must be >= resolution"),
        ({"min_bucket_reso": -64}, "min_bucket_reso must be a positive integer"),
    ],
)
def test_table_validation(kwargs, match):
    args = {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}
    with pytest.raises(LorafitError, match=match.replace("(", r"\(")):
        make_bucket_table(**(args | kwargs))


def test_verify_bucket_reso_steps_per_family():
    verify_bucket_reso_steps(64, "sd1")
    verify_bucket_reso_steps(32, "sdxl")
    with pytest.raises(LorafitError, match="multiple of 64 for sd2; got 32"):
        verify_bucket_reso_steps(32, "sd2")
    with pytest.raises(LorafitError, match="unknown model family"):
        verify_bucket_reso_steps(64, "flux")


@pytest.mark.parametrize(("table", "cases"), [(KOHYA_512, KOHYA_SELECT_512), (KOHYA_SDXL_1024, KOHYA_SELECT_SDXL)])
def test_select_bucket_matches_kohya(table, cases):
    side = 512 if table is KOHYA_512 else 1024
    for (w, h), bucket, resized, nu_bucket, nu_resized in cases:
        choice = select_bucket(w, h, table=table)
        assert (choice.bucket, choice.resized_size) == (bucket, resized), (w, h)
        assert choice.aspect_error == bucket[0] / bucket[1] - w / h
        nu = select_bucket(w, h, no_upscale=True, max_area=side * side, bucket_reso_steps=64)
        assert (nu.bucket, nu.resized_size) == (nu_bucket, nu_resized), (w, h)
        assert no_upscale_bucket(w, h, side * side, 64) == nu_bucket


def test_assign_bucket_ties_and_exact_sizes():
    # Equal aspect errors: the first bucket in table order wins, like numpy.argmin in kohya.
    assert assign_bucket(3, 2, [(256, 256), (512, 256)]) == (256, 256)
    # An image whose size is itself a bucket keeps it even when an equal-ratio bucket comes first.
    assert assign_bucket(512, 512, [(256, 256), (512, 512)]) == (512, 512)
    assert assign_bucket(300, 300, [(256, 256), (512, 512)]) == (256, 256)
    with pytest.raises(ValueError):
        assign_bucket(10, 10, [])


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_assignment_aspect_error_bounded(config):
    """Relative aspect error <= s/m + s^2/(2 m^2) (s = steps, m = min_bucket_reso).

    Walking the table's staircase (the tallest bucket for each width, and its transpose), neighbouring
    buckets differ by one step in one side, or in both sides around an inner corner, and every side is
    >= m; so neighbouring aspect ratios differ by a factor of at most (1 + s/m)^2. The nearest of two
    neighbours r1 <= r <= r2 is within (r2 - r1)/2 <= r * ((1 + s/m)^2 - 1)/2. Outside the table's ratio
    range the extreme bucket is taken.
    """
    resolution, lo, hi, steps = config
    table = make_bucket_table(resolution, lo, hi, steps)
    bound = steps / lo + steps**2 / (2 * lo**2)
    ratios = [bw / bh for bw, bh in table]
    narrowest, widest = table[ratios.index(min(ratios))], table[ratios.index(max(ratios))]
    for w, h in _random_sizes(seed=CONFIGS.index(config)):
        bucket = assign_bucket(w, h, table)
        r = w / h
        if min(ratios) <= r <= max(ratios):
            assert abs(bucket[0] / bucket[1] - r) / r <= bound, (w, h, bucket)
        else:
            assert bucket == (narrowest if r < min(ratios) else widest)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_no_upscale_invariants(config):
    resolution, _, _, steps = config
    w0, h0 = (resolution, resolution) if isinstance(resolution, int) else resolution
    max_area = w0 * h0
    for w, h in _random_sizes(seed=7, lo=steps):
        try:
            choice = select_bucket(w, h, no_upscale=True, max_area=max_area, bucket_reso_steps=steps)
        except LorafitError:
            # Only when a side shrinks below one step: the image is far more extreme than max_area allows.
            assert min(w, h) * min(1.0, math.sqrt(max_area / (w * h))) < 2 * steps
            continue
        (bw, bh), (rw, rh) = choice.bucket, choice.resized_size
        assert bw % steps == 0 and bh % steps == 0 and bw > 0 and bh > 0
        assert bw * bh <= max_area
        assert bw <= rw <= w and bh <= rh <= h  # never enlarged, and the resize covers the bucket
        assert rw - bw < steps and rh - bh < steps  # only a sliver is cropped
        if w * h <= max_area:
            assert (rw, rh) == (w, h)  # small images are not resized at all, as in kohya
        assert abs(bw / bh - w / h) / (w / h) < (steps + 1) / min(bw, bh)


def test_no_upscale_deviations_from_kohya():
    # Kohya's half-up rounding gives (456, 576) here, 512 px over max_area; we stay within it.
    bw, bh = no_upscale_bucket(6127, 7747, 512 * 512, 8)
    assert bw * bh <= 512 * 512 and (bw, bh) == (448, 568)
    # Kohya divides by zero on this 65:1 image; we give it a bucket.
    assert no_upscale_bucket(4999, 77, 512 * 512, 64) == (4096, 64)
    with pytest.raises(LorafitError, match="bucket_no_upscale: a 40x600 image"):
        no_upscale_bucket(40, 600, 512 * 512, 64)


def test_select_bucket_argument_errors():
    with pytest.raises(ValueError, match="needs a table"):
        select_bucket(100, 100)
    with pytest.raises(ValueError, match="needs max_area"):
        select_bucket(100, 100, no_upscale=True)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=str)
def test_table_resize_covers_bucket_and_crops_one_axis(config):
    resolution, lo, hi, steps = config
    table = make_bucket_table(resolution, lo, hi, steps)
    bound = steps / lo + steps**2 / (2 * lo**2)
    for w, h in _random_sizes(seed=3, n=2000):
        bucket = assign_bucket(w, h, table)
        plan = plan_resize_crop(w, h, *bucket)
        rw, rh = plan.resized_size
        assert (rw, rh) == cover_size(w, h, bucket)
        assert rw >= bucket[0] and rh >= bucket[1]
        assert rw == bucket[0] or rh == bucket[1]  # scaled to fit one side exactly
        if min(b[0] / b[1] for b in table) <= w / h <= max(b[0] / b[1] for b in table):
            # The excess is the aspect error spread over a side, so it inherits the same bound.
            assert rw - bucket[0] <= bound * bucket[0] + 1 and rh - bucket[1] <= bound * bucket[1] + 1


def test_center_crop_and_sdxl_conditioning():
    plan = plan_resize_crop(1920, 1080, 1344, 768)
    assert plan.resized_size == (1365, 768)
    assert (plan.left, plan.top) == (10, 0)  # kohya: excess // 2 = 21 // 2
    assert plan.crop_box == (10, 0, 1354, 768)
    assert plan.original_size == (1080, 1920)  # SDXL order: height first
    assert plan.crop_top_left == (0, 10)
    assert plan.target_size == (768, 1344)
    assert plan.add_time_ids == (1080, 1920, 0, 10, 768, 1344)
    assert plan.flipped_crop_top_left == (0, 1365 - 10 - 1344)


def test_random_crop_is_seeded_and_in_range():
    plans = [plan_resize_crop(1000, 3000, 384, 640, "random", random.Random(s)) for s in range(200)]
    tops = {p.top for p in plans}
    assert all(p.left == 0 for p in plans)  # no horizontal excess, so no random draw either
    assert min(tops) >= 0 and max(tops) <= 1920 - 640 and len(tops) > 50
    again = [plan_resize_crop(1000, 3000, 384, 640, "random", random.Random(s)) for s in range(200)]
    assert plans == again
    random.seed(5)
    first = plan_resize_crop(1000, 3000, 384, 640, "random")
    random.seed(5)
    assert plan_resize_crop(1000, 3000, 384, 640, "random") == first  # default rng: seeded `random`


def test_plan_resize_crop_uses_no_upscale_resize():
    choice = select_bucket(800, 600, no_upscale=True, max_area=1024 * 1024, bucket_reso_steps=64)
    plan = plan_resize_crop(800, 600, *choice.bucket, resized_size=choice.resized_size)
    assert plan.resized_size == (800, 600) and plan.crop_box == (16, 12, 784, 588)
    with pytest.raises(ValueError, match="does not cover"):
        plan_resize_crop(800, 600, 768, 576, resized_size=(700, 600))
    with pytest.raises(LorafitError, match="crop must be"):
        plan_resize_crop(800, 600, 768, 576, crop="left")  # type: ignore[arg-type]


def test_histogram_and_stats():
    assert bucket_histogram([(512, 512), (384, 640), (512, 512)]) == {(384, 640): 1, (512, 512): 2}
    assert list(bucket_histogram([(640, 384), (384, 640)])) == [(384, 640), (640, 384)]
    choices = [BucketChoice((512, 512), (512, 512), 0.0), BucketChoice((640, 384), (683, 384), -0.1)]
    stats = BucketStats.from_choices(choices)
    assert stats.counts == {(512, 512): 1, (640, 384): 1}
    assert stats.mean_aspect_error == pytest.approx(0.05)
    assert stats.lines() == [
        "bucket 512x512: 1 image",
        "bucket 640x384: 1 image",
        "mean aspect-ratio error: 0.0500",
    ]
    assert BucketStats.from_choices([]).mean_aspect_error == 0.0
