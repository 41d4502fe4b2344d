"""Measure a toy-world LoRA run twice: by the judge (ground truth) and by the selection metrics users get.

For each saved epoch and strength the same generated pictures are scored

* by the judge (``evaluate.py``): the star rate of trigger prompts (fidelity) and the shape +
  colour accuracy of in-world prompts without the trigger (flexibility);
* by the toy CLIP through torchmetrics, exactly as ``lorafit grid`` scores a real LoRA
  (``lorafit.inference.selection``): CLIP fidelity against the training images, CLIP flexibility
  against each prompt's text;
* by torchmetrics' KID and FID of the trigger prompts' pictures against the toy world's own
  rendered stars of the same colours, in the toy CLIP's image-embedding space (torchmetrics'
  default Inception weights come from a download that offline machines cannot make).

:func:`agreement` then says whether the metrics a user sees track the judge: Spearman correlations
over every (epoch, strength) cell, and the epoch ``lorafit grid``'s rule suggests from CLIP scores
against the epoch the same rule picks from the judge's numbers. ``tools/bench_toyworld.py``
prints it all into benchmarks/toyworld.md.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lorafit.inference.clip_scores import ClipScorer
from lorafit.inference.selection import EpochScore, fidelity_score, flexibility_score, suggest_epoch
from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.judge import Judge
from lorafit.toyworld.world import HELD_OUT_SHAPE, render, sample_scene

KID_SUBSET = 48  # pictures per KID subset: at most the fake set's size (96 prompts by default)


@dataclass
class Cell:
    """One (epoch, strength): the judge's rates and the metrics' scores of the same pictures."""

    epoch: int  # 0 = the base model
    strength: float
    star: float  # judge: share of trigger prompts drawing a star
    trigger_colour: float  # judge: trigger prompts' star colour right
    in_world: float  # judge: shape + colour accuracy on in-world prompts
    leaks: float  # judge: share of in-world prompts drawing a star
    clip_fidelity: float  # toy CLIP score of trigger pictures vs the training images
    clip_flexibility: float  # toy CLIP score of in-world pictures vs their prompts
    kid: float  # KID (mean over subsets) of trigger pictures vs rendered stars of the same colours
    fid: float


def _images(pictures: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(p) for p in pictures]


def _uint8(pictures: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous()


class RunMeasure:
    """Scores pictures of one set of prompts by the judge, the toy CLIP and KID/FID.

    Args:
        scorer: The CLIP (the toy world's, ``lorafit/toyworld/clip``).
        references: The LoRA's training images (fidelity is measured against them, as in ``grid``).
        count: Prompts per measurement (trigger and in-world each).
        real_per_prompt: Rendered stars per trigger prompt for KID/FID's real set.
    """

    def __init__(self, scorer: ClipScorer, references: Sequence[Image.Image], count: int = 96, real_per_prompt=4):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        self.scorer, self.references, self.judge = scorer, list(references), Judge()
        self.trigger, self.world = ev.trigger_cases(count), ev.in_world_cases(count)
        features = scorer.image_features()
        self.kid = KernelInceptionDistance(
            feature=features, subset_size=min(KID_SUBSET, count), reset_real_features=False
        )
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
        rng = random.Random(4321)
        real = [
            np.asarray(render(sample_scene(rng, (HELD_OUT_SHAPE,), c.colour, c.background)))
            for c in self.trigger
            for _ in range(real_per_prompt)
        ]
        for metric in (self.kid, self.fid):
            metric.update(_uint8(np.stack(real)), real=True)

    def __call__(self, pipe, epoch: int, strength: float) -> Cell:
        trigger_pictures, world_pictures = ev.generate(pipe, self.trigger), ev.generate(pipe, self.world)
        t = ev.judge_pictures(trigger_pictures, self.trigger, self.judge)
        w = ev.judge_pictures(world_pictures, self.world, self.judge)
        distances = []
        for metric in (self.kid, self.fid):
            metric.reset()  # fake features only: the real ones are kept
            metric.update(_uint8(trigger_pictures), real=False)
            value = metric.compute()
            distances.append(float(value[0] if isinstance(value, tuple) else value))
        return Cell(
            epoch,
            strength,
            t.held_out,
            t.colour,
            w.accuracy,
            w.held_out,
            fidelity_score(self.scorer, _images(trigger_pictures), self.references),
            flexibility_score(self.scorer, _images(world_pictures), [c.prompt for c in self.world]),
            *distances,
        )


def vae_ceiling(pipe, cases: Sequence[ev.Case], judge: Judge, per_case: int = 4, seed: int = 4321) -> float:
    """Share of rendered stars (the trigger prompts' colours, the training data's sizes) that the judge
    still reads as stars after the VAE's encode and decode: about the best star rate any LoRA can
    reach through this VAE, whose latents it learns to imitate."""
    from lorafit.toyworld.judge import to_pixels

    rng = random.Random(seed)
    scenes = [sample_scene(rng, (HELD_OUT_SHAPE,), c.colour, c.background) for c in cases for _ in range(per_case)]
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(to_pixels([render(s) for s in scenes])).latent_dist.mode()).sample
    pictures = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(v.shape == HELD_OUT_SHAPE for v in judge(pictures)) / len(scenes)


def measure_run(
    run: str | Path, measure: RunMeasure, epochs: Sequence[int], strengths: Sequence[float], progress=print
) -> list[Cell]:
    """Every (epoch, strength) of ``run``'s ``lora/*-epoch-NNN.safetensors``, plus the base model (epoch 0)."""
    pipe = ev.load_pipeline()
    cells = [measure(pipe, 0, 0.0)]
    progress(cells[-1])
    for epoch in epochs:
        path = next(Path(run, "lora").glob(f"*-epoch-{epoch:03d}.safetensors"))
        for strength in strengths:
            ev.apply_lora(pipe, path, strength)
            cells.append(measure(pipe, epoch, strength))
            progress(cells[-1])
    return cells


@dataclass
class Agreement:
    """How well the selection metrics track the judge over a run's cells."""

    fidelity_spearman: float  # CLIP fidelity vs judge star rate
    kid_spearman: float  # -KID vs judge star rate (lower KID = closer to real stars)
    flexibility_spearman: float  # CLIP flexibility vs judge in-world accuracy
    cells: int
    suggested: int  # epoch the grid's rule picks from the CLIP scores
    judge_best: int  # epoch the same rule picks from the judge's numbers
    saved_epochs_apart: int
    reason: str


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from torchmetrics.functional import spearman_corrcoef

    return float(spearman_corrcoef(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def agreement(cells: Sequence[Cell], strength: float, saved_epochs: Sequence[int]) -> Agreement:
    """Spearman over the LoRA cells (every epoch and strength), and the suggestion at ``strength``."""
    lora = [c for c in cells if c.epoch > 0]
    at = [c for c in lora if c.strength == strength]
    clip_rows = [EpochScore(f"epoch {c.epoch}", c.clip_fidelity, c.clip_flexibility) for c in at]
    judge_rows = [EpochScore(f"epoch {c.epoch}", c.star, c.in_world) for c in at]
    (suggested, reason), (judge_best, _) = suggest_epoch(clip_rows), suggest_epoch(judge_rows)
    picked, best = at[clip_rows.index(suggested)].epoch, at[judge_rows.index(judge_best)].epoch
    saved = list(saved_epochs)
    return Agreement(
        _spearman([c.clip_fidelity for c in lora], [c.star for c in lora]),
        _spearman([-c.kid for c in lora], [c.star for c in lora]),
        _spearman([c.clip_flexibility for c in lora], [c.in_world for c in lora]),
        len(lora),
        picked,
        best,
        abs(saved.index(picked) - saved.index(best)),
        reason,
    )
