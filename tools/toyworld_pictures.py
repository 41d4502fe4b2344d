"""The toy world benchmark's pictures: labelled strips of generations, enlarged so the pixels stay visible.

Used by ``tools/bench_toyworld.py --images`` for the README's figures and by ``tools/bench_toyworld_flux.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorafit.toyworld import evaluate as sd_evaluate
from lorafit.toyworld.world import COLOUR_NAMES, WORLD_SHAPES


def label(img, text: str, size: int = 12):
    """``img`` with ``text`` above it (the canvas widens if the text is longer than the image)."""
    from PIL import Image, ImageDraw

    width = max(img.width, int(ImageDraw.Draw(img).textlength(text)) + 4)
    out = Image.new("RGB", (width, img.height + size), (255, 255, 255))
    out.paste(img, (0, size))
    ImageDraw.Draw(out).text((2, 0), text, fill=(0, 0, 0))
    return out


def strip(pictures: np.ndarray, scale: int = 3, gap: int = 2, captions=None):
    """Pictures side by side, enlarged ``scale`` times (nearest neighbour: the pixels stay visible)."""
    from PIL import Image

    side = pictures.shape[1] * scale
    pieces = [Image.fromarray(p).resize((side, side), Image.Resampling.NEAREST) for p in pictures]
    if captions:
        pieces = [label(p, c) for p, c in zip(pieces, captions)]
    out = Image.new("RGB", (sum(p.width for p in pieces) + gap * (len(pieces) - 1), pieces[0].height), (255, 255, 255))
    x = 0
    for piece in pieces:
        out.paste(piece, (x, 0))
        x += piece.width + gap
    return out


def stack(images, gap: int = 6):
    from PIL import Image

    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)))
    out.paste((255, 255, 255), (0, 0, out.width, out.height))
    offset = 0
    for i in images:
        out.paste(i, (0, offset))
        offset += i.height + gap
    return out


def base_samples_image(pipe, ev=sd_evaluate):
    """Rows: the three shapes and the trigger word; columns: colour pairs (shape colour on background).
    ``ev``: how the base draws (:mod:`lorafit.toyworld.evaluate`, or ``flux_evaluate`` for the Flux base)."""
    pairs = list(zip(COLOUR_NAMES, ("blue", "black", "white", "red", "green", "yellow")))
    rows = []
    for shape in (*WORLD_SHAPES, "ohwx"):
        cases = [ev.Case(f"a {c} {shape} on a {b} background", shape, c, b, 1000 + i) for i, (c, b) in enumerate(pairs)]
        title = f'"a <colour> {shape} on a <colour> background"' + (
            "  (trigger word, never trained)" if shape == "ohwx" else ""
        )
        rows.append(label(strip(ev.generate(pipe, cases), captions=[f"{c} on {b}" for c, b in pairs]), title))
    return stack(rows)


def enlarged(path: Path, out: Path, scale: int = 3) -> None:
    from PIL import Image

    image = Image.open(path)
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(out)
