"""What both toy bases' builds draw from (tools/train_toyworld.py, tools/train_toyworld_flux.py).

The VAE's training pictures (world scenes, the judge's "other" pictures, random polygons), the
world's pictures encoded by a trained VAE with their captions, the base stage's learning-rate
schedule, and how a build names the device it ran on (recorded in each TRAINING.md).
"""

from __future__ import annotations

import math
import platform
import random

import torch

from lorafit.toyworld.judge import judge_examples, to_pixels
from lorafit.toyworld.world import JUDGE_SHAPES, render, scenes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch thread(s)"


def random_polygon(rng: random.Random):
    """A random, often concave, polygon: sharp corners and spikes of every kind for the VAE to learn."""
    from PIL import Image, ImageDraw

    from lorafit.toyworld.world import COLOUR_NAMES, COLOURS, RESOLUTION, _jittered

    colour, background = rng.sample(COLOUR_NAMES, 2)
    s = 4
    img = Image.new("RGB", (RESOLUTION * s, RESOLUTION * s), _jittered(rng, COLOURS[background]))
    r, n = rng.uniform(6, 13) * s, rng.randint(3, 12)
    cx, cy = rng.uniform(r, RESOLUTION * s - r), rng.uniform(r, RESOLUTION * s - r)
    step = 2 * math.pi / n
    angles = [k * step + rng.uniform(-0.3, 0.3) * step for k in range(n)]
    points = [
        (cx + r * rng.uniform(0.3, 1.0) * math.cos(a), cy + r * rng.uniform(0.3, 1.0) * math.sin(a)) for a in angles
    ]
    ImageDraw.Draw(img).polygon(points, fill=_jittered(rng, COLOURS[colour]))
    return img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def vae_pictures(seed: int, count: int) -> torch.Tensor:
    """The VAE's training pictures: world scenes, the judge's "other" pictures and random polygons.

    The VAE plays the part of SD's general-purpose autoencoder, so it learns from more than the
    base model's world: random (often spiky, concave) polygons teach it corners and points in
    general. The star itself is filtered out; tools/bench_toyworld.py checks that the VAE still
    encodes a star well enough for the judge to recognise the reconstruction.
    """
    rng = random.Random(seed)
    images, labels = judge_examples(rng, count - count // 3, other_fraction=0.3)
    world = to_pixels(images[labels[:, 0] != JUDGE_SHAPES.index("star")])
    polygons = to_pixels([random_polygon(rng) for _ in range(count // 3)])
    return torch.cat([world, polygons])


def warmup_cosine(optimizer, steps: int, warmup: int, floor: float = 0.1):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def encode_world(vae, seed: int, count: int, device) -> tuple[torch.Tensor, list[str]]:
    """VAE posterior moments (mean, logvar on channels) and captions of ``count`` world scenes."""
    world = scenes(seed, count)
    moments = []
    for i in range(0, count, 512):
        pixels = to_pixels([render(s) for s in world[i : i + 512]]).to(device)
        posterior = vae.encode(pixels).latent_dist
        moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1))
    return torch.cat(moments), [s.caption() for s in world]
