"""The toy world: one flat-coloured shape on a plain background, with a caption that names both.

Every picture is drawn from a :class:`Scene` (shape, colours, size, position) by :func:`render`,
and every scene has one caption, "a red circle on a blue background". The base model learns
the in-world shapes; the **held-out** shape (a five-pointed star) never appears in its training
data, so the demo LoRA has something the base model demonstrably cannot draw.

Why these choices:

* 32x32 pixels, flat colours, upright shapes: small enough that a UNet trains on one CPU core in
  tens of minutes, large enough that a star's five points are visible.
* Six colours that stay far apart in RGB (and in any blur of them), so "which colour" is never
  ambiguous for the judge.
* Size and position vary but are not captioned: they are what the captions do not describe,
  as in a real dataset.
* Shapes are drawn 4x larger and box-filtered down: PIL's polygon fill has no antialiasing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 75, 215),
    "yellow": (240, 210, 45),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

WORLD_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELD_OUT_SHAPE = "star"
# Everything the judge can name. "other" is for pictures that show none of the shapes
# (no shape, two shapes, a stretched blob), so a malformed generation is not forced into a class.
JUDGE_SHAPES: tuple[str, ...] = (*WORLD_SHAPES, HELD_OUT_SHAPE, "other")

# The demo LoRA's trigger word. Like "ohwx" in real CLIP it is a token the base model was never
# trained on; the LoRA has to give it a meaning (the star).
TRIGGER = "ohwx"

_SUPERSAMPLE = 4
_JITTER = 12  # per-channel colour noise, so no class is identified by an exact RGB value
_MIN_RADIUS, _MAX_RADIUS = 7.0, 11.0
_STAR_INNER = 0.45  # inner/outer radius; fatter than the geometric 0.38 so the arms survive 32 px


@dataclass(frozen=True)
class Scene:
    """One picture of the world, fully determined (rendering is deterministic)."""

    shape: str
    colour: str
    background: str
    radius: float  # pixels at the output resolution
    cx: float
    cy: float
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    def caption(self, shape_word: str | None = None) -> str:
        """ "a red circle on a blue background"; ``shape_word`` replaces the shape's name."""
        return prompt(self.colour, shape_word or self.shape, self.background)


def prompt(colour: str, shape: str, background: str) -> str:
    """The world's one caption template."""
    return f"a {colour} {shape} on a {background} background"


def _jittered(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-_JITTER, _JITTER))) for c in rgb)  # type: ignore[return-value]


def sample_scene(
    rng: random.Random,
    shapes: Sequence[str] = WORLD_SHAPES,
    colour: str | None = None,
    background: str | None = None,
    resolution: int = RESOLUTION,
) -> Scene:
    """Draw a random scene; ``colour``/``background`` fix those parts (they must differ)."""
    shape = rng.choice(list(shapes))
    colour = colour or rng.choice(COLOUR_NAMES)
    background = background or rng.choice([c for c in COLOUR_NAMES if c != colour])
    if colour == background:
        raise ValueError(f"colour and background are both {colour!r}")
    scale = resolution / RESOLUTION
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * scale
    margin = radius * _extent(shape) + 1.0 * scale
    cx = rng.uniform(margin, resolution - margin)
    cy = rng.uniform(margin, resolution - margin)
    return Scene(
        shape, colour, background, radius, cx, cy, _jittered(rng, COLOURS[colour]), _jittered(rng, COLOURS[background])
    )


def _extent(shape: str) -> float:
    """How far the drawn shape reaches from its centre, in units of the scene radius."""
    return {"circle": 1.0, "square": 0.9, "triangle": 1.25, "star": 1.2}.get(shape, 1.0)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.9
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright equilateral, centred on its circumcentre
        R = r * 1.25
        return [(cx + R * math.cos(math.radians(a)), cy + R * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":  # upright five-pointed star
        R = r * 1.2
        return [
            (
                cx + (R if k % 2 == 0 else R * _STAR_INNER) * math.cos(math.radians(36 * k - 90)),
                cy + (R if k % 2 == 0 else R * _STAR_INNER) * math.sin(math.radians(36 * k - 90)),
            )
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape (coordinates already in the canvas' pixel units)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def render(scene: Scene, resolution: int | None = None) -> Image.Image:
    """The scene as an RGB image (``resolution`` defaults to the size the scene was drawn for)."""
    size = resolution or RESOLUTION
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), scene.background_rgb)
    draw_shape(ImageDraw.Draw(img), scene.shape, scene.cx * s, scene.cy * s, scene.radius * s, scene.colour_rgb)
    # BOX = the mean over each 4x4 block: exact area coverage, no ringing around the edges.
    return img.resize((size, size), Image.Resampling.BOX)


def scenes(seed: int, count: int, shapes: Sequence[str] = WORLD_SHAPES) -> list[Scene]:
    """``count`` random scenes from ``seed`` (the same seed always gives the same scenes)."""
    rng = random.Random(seed)
    return [sample_scene(rng, shapes) for _ in range(count)]


def to_array(images: Iterable[Image.Image]) -> np.ndarray:
    """Images as uint8 ``[N, H, W, 3]``."""
    return np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images])


def prompt_grid(shapes: Sequence[str] = WORLD_SHAPES) -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) combination with colour != background, in a fixed order."""
    return [(c, s, b) for s in shapes for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]
