"""A tiny procedural dataset in kohya layout, so the demo and the tests need no downloads.

The concept is "ohwx star": a yellow five-pointed star of varied size, position and rotation on
varied plain backgrounds. A star is easy to judge by eye in a sample grid (did the LoRA learn
"yellow, five points" rather than "blue square"?) and the varied backgrounds give the captions
something to describe, as a real dataset's captions describe what is *not* the concept.

One image is written without a caption on purpose: the demo then shows the folder-name
fallback warning a kohya user would see on their own data.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

CONCEPT_FOLDER = "5_ohwx star"
TRIGGER = "ohwx star"

# Backgrounds chosen to contrast with yellow (no orange, no white) so the star stays the subject.
_BACKGROUNDS = (
    ("blue", (40, 70, 170)),
    ("red", (170, 35, 40)),
    ("green", (40, 120, 60)),
    ("purple", (100, 50, 140)),
    ("black", (20, 20, 20)),
    ("teal", (20, 120, 130)),
    ("gray", (110, 110, 110)),
)
_SIZES = ((0.16, "small"), (0.26, "medium"), (0.36, "large"))

# Inner/outer radius of a regular five-pointed star: sin(18 deg) / sin(54 deg).
_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))
# Drawn this many times larger, then shrunk with Lanczos: PIL's polygon fill has no antialiasing.
_SUPERSAMPLE = 4


def _star_points(cx: float, cy: float, radius: float, rotation_deg: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * _INNER_RATIO
        angle = math.radians(rotation_deg + 36 * k - 90)  # -90: first point straight up at rotation 0
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_star(rng: random.Random, resolution: int) -> tuple[Image.Image, str]:
    """One image and its caption (without the trigger) drawn from rng."""
    bg_name, bg = rng.choice(_BACKGROUNDS)
    fraction, size_word = rng.choice(_SIZES)
    canvas = resolution * _SUPERSAMPLE
    radius = canvas * (fraction + rng.uniform(-0.03, 0.03))
    cx = rng.uniform(radius, canvas - radius)
    cy = rng.uniform(radius, canvas - radius)
    rotation = rng.uniform(0.0, 72.0)  # a five-pointed star repeats every 72 degrees
    yellow = (rng.randint(235, 255), rng.randint(195, 225), rng.randint(0, 40))

    img = Image.new("RGB", (canvas, canvas), bg)
    ImageDraw.Draw(img).polygon(_star_points(cx, cy, radius, rotation), fill=yellow)
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img, f"a {size_word} yellow star on a {bg_name} background"


def write_demo_dataset(
    out: str | Path,
    num_images: int = 8,
    resolution: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Writes the "ohwx star" demo dataset as ``out/5_ohwx star/star_000.png`` plus captions.

    The same seed always gives byte-identical files. The last image gets no caption file, to
    exercise the fallback to the folder prompt ("ohwx star").

    Args:
        out: Dataset root to create; pass it as ``data.train_dir``.
        num_images: How many images to draw.
        resolution: Side of each square image in pixels.
        seed: Seed of the drawing.
        overwrite: Rebuild the concept folder even when it already exists.

    Returns:
        The dataset root ``out``.
    """
    if num_images < 1:
        raise LorafitError(f"demo dataset num_images is {num_images}; use 1 or more")
    if resolution < 8:
        raise LorafitError(f"demo dataset resolution is {resolution}; use 8 or more")
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise LorafitError(f"demo dataset path {root} is a file; choose a folder path")
    target = root / CONCEPT_FOLDER
    if target.exists() and not overwrite:
        logger.info("demo dataset already at %s; pass overwrite=True to redraw it", target)
        return root

    # Draw into a hidden sibling and rename it into place, so an interrupted run never leaves a
    # half-written folder that a later call would mistake for a finished dataset. The scanner
    # skips hidden folders, so a leftover staging folder cannot leak into training.
    staging = root / f".{CONCEPT_FOLDER}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(num_images):
        img, description = _draw_star(rng, resolution)
        img.save(staging / f"star_{i:03d}.png", format="PNG")
        if i != num_images - 1:
            (staging / f"star_{i:03d}.txt").write_text(f"{TRIGGER}, {description}\n", encoding="utf-8")
    if target.exists():
        # Only our own concept folder is removed; anything else the user keeps in root stays.
        shutil.rmtree(target)
    os.replace(staging, target)
    logger.info("wrote %d demo images to %s", num_images, target)
    return root
