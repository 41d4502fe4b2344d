"""The judge: a small CNN that names the shape, its colour and the background of a toy-world picture.

Every quality number of the toy world (base-model accuracy, the held-out concept's rate, a LoRA's
fidelity and flexibility) is this classifier's verdict on generated pictures, so it is trained
to be hard to fool rather than easy to please:

* a fifth shape class, ``other``, for pictures that show none of the named shapes (no shape, two
  shapes, stretched ellipses and bars, crosses, outlines): a malformed generation is not forced
  into the nearest class;
* augmentations (blur, noise, contrast and hue-free brightness shifts) so the soft edges and
  noise of generated pictures do not move its answers.

It never sees a generated picture in training: it only knows the renderer, so it cannot learn the
base model's habits. Its accuracy on fresh rendered pictures is measured by ``tools/bench_toyworld.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lorafit.toyworld.world import (
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_SHAPE,
    JUDGE_SHAPES,
    RESOLUTION,
    WORLD_SHAPES,
    _jittered,
    draw_shape,
    render,
    sample_scene,
    to_array,
)

JUDGE_FILE = Path(__file__).parent / "judge.safetensors"
_OTHER = JUDGE_SHAPES.index("other")


class JudgeNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and three heads: shape, colour, background."""

    def __init__(self, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 128), nn.ReLU())
        self.shape = nn.Linear(128, len(JUDGE_SHAPES))
        self.colour = nn.Linear(128, len(COLOUR_NAMES))
        self.background = nn.Linear(128, len(COLOUR_NAMES))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pixels``: float ``[B, 3, 32, 32]`` in ``[-1, 1]``; returns the three heads' logits."""
        h = self.hidden(self.features(pixels))
        return self.shape(h), self.colour(h), self.background(h)


# ---- training examples -------------------------------------------------------------------------


def _other_example(rng: random.Random) -> tuple[Image.Image, str | None, str]:
    """A picture of none of the judge's shapes, with its (colour, background); no colour if empty."""
    colour = rng.choice(COLOUR_NAMES)
    background = rng.choice([c for c in COLOUR_NAMES if c != colour])
    fill, bg = _jittered(rng, COLOURS[colour]), _jittered(rng, COLOURS[background])
    s = 4
    size = RESOLUTION * s
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(("empty", "ellipse", "bar", "two", "cross", "outline"))
    cx, cy = rng.uniform(10, 22) * s, rng.uniform(10, 22) * s
    if kind == "ellipse" or kind == "bar":
        long, short = rng.uniform(9, 14) * s, rng.uniform(2.5, 5) * s
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
        box = [cx - w, cy - h, cx + w, cy + h]
        draw.ellipse(box, fill=fill) if kind == "ellipse" else draw.rectangle(box, fill=fill)
    elif kind == "two":
        for x, y in ((rng.uniform(5, 12), rng.uniform(5, 27)), (rng.uniform(20, 27), rng.uniform(5, 27))):
            draw_shape(draw, rng.choice(WORLD_SHAPES), x * s, y * s, rng.uniform(3.5, 5) * s, fill)
    elif kind == "cross":
        r, t = rng.uniform(8, 12) * s, rng.uniform(2, 3.5) * s
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif kind == "outline":
        r = rng.uniform(7, 10) * s
        draw_shape(draw, rng.choice(WORLD_SHAPES), cx, cy, r, fill)
        draw_shape(draw, "circle", cx, cy, r * 0.6, bg)
    return img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), None if kind == "empty" else colour, background


def judge_examples(rng: random.Random, count: int, other_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rendered pictures (uint8 ``[N, 32, 32, 3]``) and labels ``[N, 3]`` (shape, colour, background).

    Label values index ``JUDGE_SHAPES`` and ``COLOUR_NAMES``; an empty picture's colour is -1.

    The four named shapes come in equal shares; ``other_fraction`` of the pictures are "other".
    """
    images, labels = [], []
    named = (*WORLD_SHAPES, HELD_OUT_SHAPE)
    for _ in range(count):
        if rng.random() < other_fraction:
            img, colour, background = _other_example(rng)
            shape = _OTHER
        else:
            scene = sample_scene(rng, named)
            img, colour, background = render(scene), scene.colour, scene.background
            shape = JUDGE_SHAPES.index(scene.shape)
        images.append(img)
        labels.append((shape, -1 if colour is None else COLOUR_NAMES.index(colour), COLOUR_NAMES.index(background)))
    return to_array(images), np.asarray(labels, dtype=np.int64)


def to_pixels(images: np.ndarray | Sequence[Image.Image]) -> torch.Tensor:
    """Pictures -> float ``[N, 3, 32, 32]`` in ``[-1, 1]``.

    Takes PIL images, uint8 ``[N, H, W, 3]``, or float ``[N, H, W, 3]`` in ``[0, 1]`` (what a
    diffusers pipeline returns with ``output_type="np"``).
    """
    array = images if isinstance(images, np.ndarray) else to_array(images)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)  # as the pipeline's PIL output
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if pixels.shape[-1] != RESOLUTION:
        pixels = F.interpolate(pixels, size=(RESOLUTION, RESOLUTION), mode="area")
    return pixels


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, brightness and contrast changes of the kind a generator's output shows."""
    n = pixels.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    # A 3x3 blur of random strength per picture (0 = none).
    strength = uniform(0.0, 0.6, 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pixels = pixels + strength * (blurred - pixels)
    pixels = (
        (pixels - pixels.mean((1, 2, 3), keepdim=True)) * uniform(0.8, 1.1, 1, 1, 1)
        + pixels.mean((1, 2, 3), keepdim=True)
        + uniform(-0.1, 0.1, 1, 1, 1)
    )
    pixels = pixels + torch.randn(pixels.shape, generator=generator) * uniform(0.0, 0.12, 1, 1, 1)
    return pixels.clamp(-1, 1)


def train_judge(
    steps: int = 3000, batch_size: int = 128, pool_size: int = 40000, seed: int = 0, log_every: int = 250
) -> JudgeNet:
    """Train a judge from scratch on rendered pictures (a pool of ``pool_size``, augmented every step)."""
    torch.manual_seed(seed)
    images, labels = judge_examples(random.Random(seed), pool_size)
    pixels, targets = to_pixels(images), torch.from_numpy(labels)
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        batch = augment(pixels[index], generator)
        if torch.rand((), generator=generator) < 0.5:  # the world has no handedness
            batch = batch.flip(-1)
        shape, colour, background = net(batch)
        y = targets[index]
        # ignore_index: an empty picture has no shape colour to name.
        loss = (
            F.cross_entropy(shape, y[:, 0])
            + F.cross_entropy(colour, y[:, 1], ignore_index=-1)
            + F.cross_entropy(background, y[:, 2])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"judge step {step}: loss {loss.item():.4f}", flush=True)
    return net.eval()


# ---- using it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one picture."""

    shape: str
    colour: str
    background: str
    shape_confidence: float


class Judge:
    """The trained judge, loaded from the file shipped with lorafit."""

    def __init__(self, net: JudgeNet | None = None, path: str | Path = JUDGE_FILE):
        if net is None:
            from safetensors.torch import load_file

            net = JudgeNet()
            net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray | Sequence[Image.Image]) -> list[Verdict]:
        shape, colour, background = self.net(to_pixels(images))
        probs = shape.softmax(-1)
        return [
            Verdict(JUDGE_SHAPES[int(s)], COLOUR_NAMES[int(c)], COLOUR_NAMES[int(b)], float(p.max()))
            for s, c, b, p in zip(shape.argmax(-1), colour.argmax(-1), background.argmax(-1), probs)
        ]

    def save(self, path: str | Path = JUDGE_FILE) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))


def accuracy_on_fresh_pictures(
    judge: Judge, seed: int = 12345, count: int = 2000, augmented: bool = False
) -> dict[str, float]:
    """The judge's accuracy per head on pictures it never saw (rendered from ``seed``)."""
    images, labels = judge_examples(random.Random(seed), count)
    pixels = to_pixels(images)
    if augmented:
        pixels = augment(pixels, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        outputs = judge.net(pixels)
    result = {}
    for name, logits, column in zip(("shape", "colour", "background"), outputs, range(3)):
        truth = torch.from_numpy(labels[:, column])
        known = truth >= 0
        result[name] = float((logits.argmax(-1)[known] == truth[known]).float().mean())
    return result
