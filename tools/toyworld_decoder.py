"""The ``vae-decoder`` stage of tools/train_toyworld.py: fine-tune the toy VAE's decoder on generic shapes.

Why: the toy VAE (``vae`` stage) learnt from world pictures, the judge's "other" pictures and
random polygons only, and its decoder rounds off shapes it has not seen: of rendered stars in the
trigger prompts' colours, encoded and decoded, the judge read only 90.1% as stars, the points of
low-contrast stars (white on yellow, blue on red) melting into blobs. A LoRA learns to produce the
encoder's latents, so that was the highest star rate any LoRA on the toy base could reach. SD's
VAE decodes shapes it was never shown because it was trained on everything; this stage gives the
toy decoder a broader family of generic shapes (rotated ellipses, convex polygons, rotated
rectangles, rings) so it learns to draw edges and corners in general. The star stays out of
every picture: no generic shape is concave with spikes.

The ENCODER (and ``quant_conv``) is frozen and saved bit-identical, with the same
``scaling_factor``: the base UNet was trained on its latents, and every cached latent and every
LoRA trained on the base stays valid. Only ``decoder.*`` and ``post_quant_conv.*`` change
(``tests/test_toyworld_vae.py`` checks both).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lorafit.toyworld.judge import to_pixels
from lorafit.toyworld.world import COLOUR_NAMES, COLOURS, RESOLUTION, _jittered

GENERIC_KINDS = ("ellipse", "convex", "rectangle", "ring")
_S = 4  # supersampling, as world.render: PIL's polygon fill has no antialiasing


def convex_outline(rng: random.Random, kind: str, angle: float) -> list[tuple[float, float]]:
    """The outline of an ``ellipse``, ``convex`` polygon or ``rectangle`` around (0, 0), in pixels,
    rotated by ``angle`` (radians).

    Every outline is convex: an ellipse; a rectangle; 3 to 8 points at sorted random angles on an
    ellipse (points on an ellipse in angular order always make a convex polygon). No spikes, so
    nothing star-like.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    if kind == "ellipse":
        a, b, n = rng.uniform(3, 13), rng.uniform(3, 13), 48
        ts = [2 * math.pi * k / n for k in range(n)]
        local = [(a * math.cos(t), b * math.sin(t)) for t in ts]
    elif kind == "rectangle":
        w, h = rng.uniform(2, 12), rng.uniform(2, 12)
        local = [(-w, -h), (w, -h), (w, h), (-w, h)]
    elif kind == "convex":
        a, b = rng.uniform(5, 13), rng.uniform(5, 13)
        ts = sorted(rng.uniform(0, 2 * math.pi) for _ in range(rng.randint(3, 8)))
        local = [(a * math.cos(t), b * math.sin(t)) for t in ts]
    else:
        raise ValueError(f"no convex outline for {kind!r}")
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in local]


def generic_shape(rng: random.Random) -> tuple[Image.Image, str]:
    """One generic, non-star shape on a plain background, in the world's colours and sizes.

    Kinds (``GENERIC_KINDS``), each at a random size and position: a rotated ellipse (axes 3 to
    13 px), convex polygon (3 to 8 vertices) or rectangle (sides 4 to 24 px), see
    :func:`convex_outline`; or a ``ring``, an annulus 1.5 to 4 px thick (not convex, but round).

    The colour pair is any two different world colours, so low-contrast pairs (white on yellow)
    get as many edges to learn from as high-contrast ones.
    """
    colour, background = rng.sample(COLOUR_NAMES, 2)
    size = RESOLUTION * _S
    img = Image.new("RGB", (size, size), _jittered(rng, COLOURS[background]))
    draw = ImageDraw.Draw(img)
    fill = _jittered(rng, COLOURS[colour])
    kind = rng.choice(GENERIC_KINDS)
    angle = rng.uniform(0, math.pi)  # drawn for rings too: it keeps the random stream of the recorded runs
    if kind == "ring":
        outer = rng.uniform(5, 13)
        inner = outer - rng.uniform(1.5, min(4.0, outer - 2))
        cx, cy = rng.uniform(outer + 1, RESOLUTION - outer - 1), rng.uniform(outer + 1, RESOLUTION - outer - 1)
        draw.ellipse([(cx - outer) * _S, (cy - outer) * _S, (cx + outer) * _S, (cy + outer) * _S], fill=fill)
        bg = img.getpixel((0, 0))
        draw.ellipse([(cx - inner) * _S, (cy - inner) * _S, (cx + inner) * _S, (cy + inner) * _S], fill=bg)
    else:
        points = convex_outline(rng, kind, angle)
        reach_x = max(abs(x) for x, _ in points) + 1
        reach_y = max(abs(y) for _, y in points) + 1
        cx = rng.uniform(min(reach_x, RESOLUTION / 2), max(RESOLUTION - reach_x, RESOLUTION / 2))
        cy = rng.uniform(min(reach_y, RESOLUTION / 2), max(RESOLUTION - reach_y, RESOLUTION / 2))
        draw.polygon([((cx + x) * _S, (cy + y) * _S) for x, y in points], fill=fill)
    return img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), kind


def generic_pictures(seed: int, count: int) -> torch.Tensor:
    """``count`` generic shapes (:func:`generic_shape`) as ``[N, 3, 32, 32]`` pixels in ``[-1, 1]``."""
    rng = random.Random(seed)
    return to_pixels([generic_shape(rng)[0] for _ in range(count)])


def edge_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the pictures' horizontal and vertical pixel differences.

    MSE alone prefers a soft edge to a slightly misplaced sharp one, and a low-contrast edge (white
    on yellow) costs it little either way; on differences a blurred point of a shape costs as
    much as a missing one.
    """

    def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (tx, ty) = gradients(reconstruction), gradients(target)
    return F.l1_loss(rx, tx) + F.l1_loss(ry, ty)


def encoder_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the encoder's and quant_conv's weights in fp16, as the base stores them (names and
    bytes, sorted by name). fp16 -> fp32 -> fp16 is exact, so a frozen encoder keeps its digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior (mean, logvar) of every picture: the encoder is frozen, so it runs once."""
    return torch.cat([vae.encode(pixels[i : i + 512]).latent_dist.parameters for i in range(0, len(pixels), 512)])


def finetune_decoder(
    vae,
    pixels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    edge_weight: float,
    seed: int,
    make_schedule,
    progress=print,
) -> dict[str, float]:
    """Train ``vae.decoder`` and ``vae.post_quant_conv`` on ``pixels``; everything else stays frozen.

    The latents are posterior samples, as in the ``vae`` stage, so the decoder also learns to
    decode the slightly noisy latents a diffusion model produces, not only the means.
    ``make_schedule(optimizer, steps)`` gives the learning-rate schedule.
    """
    vae.requires_grad_(False).eval()
    trained = [vae.decoder, vae.post_quant_conv]
    params = [p for m in trained for p in m.parameters()]
    for m in trained:
        m.requires_grad_(True).train()
    moments = _moments(vae, pixels)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = make_schedule(optimizer, steps)
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    start, mse_log, edge_log = time.time(), [], []
    for step in range(steps):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator, device=pixels.device)
        mean, logvar = moments[index].chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, device=pixels.device)
        reconstruction = vae.decode(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise).sample
        x = pixels[index]
        mse, edges = F.mse_loss(reconstruction, x), edge_loss(reconstruction, x)
        loss = mse + edge_weight * edges
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        mse_log.append(mse.item())
        edge_log.append(edges.item())
        if step % 100 == 0 or step == steps - 1:
            progress(
                f"vae-decoder step {step}: mse {sum(mse_log[-100:]) / len(mse_log[-100:]):.5f} "
                f"edges {sum(edge_log[-100:]) / len(edge_log[-100:]):.4f} ({time.time() - start:.0f} s)"
            )
    vae.eval().requires_grad_(False)
    last = min(200, steps)
    return {"final_mse": sum(mse_log[-last:]) / last, "final_edge_l1": sum(edge_log[-last:]) / last}


@torch.no_grad()
def reconstruction_check(vae) -> dict[str, float]:
    """What tools/bench_toyworld.py reports of a VAE: the judge's reading of reconstructions.

    ``world``: 256 world pictures read as their shape; ``star``: 256 stars (never in any training
    picture) read as stars; ``ceiling``: ``lorafit.toyworld.benchmark.vae_ceiling`` (stars in the
    96 trigger prompts' colours, 4 each).
    """
    from lorafit.toyworld import evaluate as ev
    from lorafit.toyworld.benchmark import vae_ceiling
    from lorafit.toyworld.judge import Judge
    from lorafit.toyworld.world import HELD_OUT_SHAPE, WORLD_SHAPES, render, scenes

    judge, vae = Judge(), vae.float().cpu()
    result = {}
    for name, shapes in (("world", WORLD_SHAPES), ("star", (HELD_OUT_SHAPE,))):
        drawn = scenes(777, 256, shapes)
        decoded = vae.decode(vae.encode(to_pixels([render(s) for s in drawn])).latent_dist.mode()).sample
        pictures = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        result[name] = sum(v.shape == s.shape for v, s in zip(judge(pictures), drawn)) / len(drawn)
    result["ceiling"] = vae_ceiling(SimpleNamespace(vae=vae), ev.trigger_cases(96), judge)
    return result


def save_fp16(vae, out: Path) -> None:
    """Save as the base's other parts are: fp16 safetensors, same config."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers' notice about fp32-kept modules: this VAE has none
    try:
        vae.to("cpu", torch.float16).save_pretrained(out, safe_serialization=True)
    finally:
        logging.set_verbosity(level)
