"""Toy-world datasets for the teaching methods of docs/teaching-methods.md, written as kohya folders.

- :func:`write_masked_concept`: star pictures that all share one background colour, each with the
  star's own ``_mask.png``: what masked training is for (the concept, not the background of its
  pictures). Captions leave the background unnamed, so without masks the LoRA has every reason to
  tie the trigger word to that colour.
- :func:`write_concept_folder`: star pictures under any trigger word (``<ohwx>`` for textual
  inversion, whose token must be new to the tokenizer), optionally without world pictures (for
  the output-preserving prior, which needs none).
- :func:`write_world_folder`: world pictures with their captions, the x_t source of sliders.
- :func:`write_brightness_pairs`: image pairs for a slider (the same scene on black, then on white,
  side by side), captioned with the scene's own coloured background.

Every picture comes from :mod:`lorafit.toyworld.world` with a seed, so a seed writes the same files.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lorafit.toyworld.world import (
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_SHAPE,
    RESOLUTION,
    TRIGGER,
    WORLD_SHAPES,
    Scene,
    draw_shape,
    render,
    sample_scene,
)

_SUPERSAMPLE = 4


def shape_mask(scene: Scene, resolution: int = RESOLUTION, outline: bool = False) -> Image.Image:
    """The scene's shape as an ``L`` mask (white = shape), antialiased like :func:`~lorafit.toyworld.world.render`.

    ``outline``: the disk around the shape instead (a star's points and the gaps between them): a
    shape is as much its outline against the background as its inside, and a mask that leaves the
    gaps out teaches a pentagon (measured: no star drawn after 200 steps with the exact mask).
    """
    s = _SUPERSAMPLE
    mask = Image.new("L", (resolution * s, resolution * s), 0)
    if outline:
        r = scene.radius * s * 1.3
        ImageDraw.Draw(mask).ellipse([scene.cx * s - r, scene.cy * s - r, scene.cx * s + r, scene.cy * s + r], fill=255)
    else:
        draw_shape(ImageDraw.Draw(mask), scene.shape, scene.cx * s, scene.cy * s, scene.radius * s, 255)
    return mask.resize((resolution, resolution), Image.Resampling.BOX)


def _write(folder: Path, name: str, image: Image.Image, caption: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png", format="PNG")
    (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder / f"{name}.png"


def write_masked_concept(
    out: str | Path, background: str = "black", num_images: int = 16, repeats: int = 20, seed: int = 0
) -> Path:
    """``out/<repeats>_ohwx/``: stars of every colour on ``background`` only, captioned "a red ohwx"
    (the background unnamed), each with ``ohwx_NNN_mask.png`` covering exactly its star."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_{TRIGGER}"
    colours = [c for c in COLOUR_NAMES if c != background]
    for i in range(num_images):
        colour = colours[i % len(colours)]
        scene = sample_scene(rng, (HELD_OUT_SHAPE,), colour=colour, background=background)
        path = _write(folder, f"{TRIGGER}_{i:03d}", render(scene), f"a {colour} {TRIGGER}")
        shape_mask(scene).save(path.with_name(f"{path.stem}_mask.png"))
    return Path(out)


def write_concept_folder(
    out: str | Path, trigger: str = TRIGGER, num_images: int = 16, repeats: int = 20, seed: int = 0
) -> Path:
    """``out/<repeats>_<trigger>/``: stars captioned "a red <trigger> on a blue background"."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_{trigger}"
    for i in range(num_images):
        scene = sample_scene(rng, (HELD_OUT_SHAPE,))
        _write(folder, f"star_{i:03d}", render(scene), scene.caption(trigger))
    return Path(out)


def write_world_folder(out: str | Path, num_images: int = 64, repeats: int = 1, seed: int = 1) -> Path:
    """``out/<repeats>_world/``: in-world pictures with their captions."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_world"
    for i in range(num_images):
        scene = sample_scene(rng, WORLD_SHAPES)
        _write(folder, f"world_{i:03d}", render(scene), scene.caption())
    return Path(out)


def write_brightness_pairs(out: str | Path, num_images: int = 64, repeats: int = 5, seed: int = 2) -> Path:
    """``out/<repeats>_pairs/``: 64x32 pictures, a world scene on black (left, "less") beside the same
    scene on white (right, "more"), captioned with the coloured background the scene was drawn with
    ("a red circle on a blue background"): model.slider.image_pairs then learns the brightness alone."""
    rng = random.Random(seed)
    folder = Path(out) / f"{repeats}_pairs"
    plain = [c for c in COLOUR_NAMES if c not in ("white", "black")]
    for i in range(num_images):
        scene = sample_scene(rng, WORLD_SHAPES, colour=rng.choice(plain))
        while scene.background in ("white", "black"):
            scene = sample_scene(rng, WORLD_SHAPES, colour=scene.colour)
        pair = Image.new("RGB", (2 * RESOLUTION, RESOLUTION))
        for x, background in ((0, "black"), (RESOLUTION, "white")):
            pair.paste(render(dataclasses.replace(scene, background_rgb=COLOURS[background])), (x, 0))
        _write(folder, f"pair_{i:03d}", pair, scene.caption())
    return Path(out)


def background_luminance(pictures) -> list[float]:
    """Mean luminance (0..255) of each picture's border pixels: the background, whatever the shape does."""
    import numpy as np

    pictures = np.asarray(pictures, dtype=np.float32)
    gray = pictures @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    edges = [gray[:, :2], gray[:, -2:], gray[:, :, :2], gray[:, :, -2:]]
    return np.concatenate([edge.reshape(len(gray), -1) for edge in edges], axis=1).mean(axis=1).tolist()
