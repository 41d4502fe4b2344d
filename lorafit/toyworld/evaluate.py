"""Measure what a toy-world pipeline draws: generate for known prompts, let the judge score it.

The same functions serve the test (``tests/test_toyworld.py``), the benchmark
(``tools/bench_toyworld.py``) and a user checking their own LoRA on the toy base:

    pipe = load_pipeline()                                   # the shipped base model
    apply_lora(pipe, "runs/demo/lora/ohwx-epoch-004.safetensors", strength=1.0)
    print(score(pipe, trigger_cases(64)).held_out)           # share of pictures that show a star

Every picture's starting noise comes from its own seed, so a case draws the same picture whatever
batch it is generated in, and two models compare on identical noise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lorafit.toyworld.judge import Judge, Verdict
from lorafit.toyworld.world import (
    COLOUR_NAMES,
    HELD_OUT_SHAPE,
    RESOLUTION,
    TRIGGER,
    WORLD_SHAPES,
    prompt,
    prompt_grid,
)

BASE_DIR = Path(__file__).parent / "base"
ADAPTER = "lora"

# Sampling settings the reported numbers use: DDIM, 20 steps, classifier-free guidance 4.
STEPS = 20
GUIDANCE = 4.0


@dataclass(frozen=True)
class Case:
    """One prompt and what a correct picture for it shows."""

    prompt: str
    shape: str
    colour: str
    background: str
    seed: int


@dataclass(frozen=True)
class Score:
    """Shares of pictures (0..1) in which the judge saw what the prompts asked for."""

    count: int
    shape: float  # requested shape
    colour: float  # requested shape colour
    background: float  # requested background colour
    accuracy: float  # requested shape and shape colour (the headline number)
    held_out: float  # the held-out shape (star), whatever was asked
    verdicts: tuple[Verdict, ...] = ()

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("count", "shape", "colour", "background", "accuracy", "held_out")}


def in_world_cases(count: int, seed: int = 0, shapes: Sequence[str] = WORLD_SHAPES) -> list[Case]:
    """``count`` in-world prompts covering shapes and colour pairs evenly (shuffled by ``seed``)."""
    grid = prompt_grid(shapes)
    random.Random(seed).shuffle(grid)
    # Interleave shapes so any prefix of the list is balanced between them.
    position, seen = {}, {}
    for case in grid:
        position[case] = seen[case[1]] = seen.get(case[1], -1) + 1
    grid.sort(key=position.__getitem__)
    cases = []
    for i in range(count):
        colour, shape, background = grid[i % len(grid)]
        cases.append(Case(prompt(colour, shape, background), shape, colour, background, seed * 100003 + i))
    return cases


def trigger_cases(count: int, seed: int = 0, word: str = TRIGGER) -> list[Case]:
    """``count`` prompts that name the held-out shape by ``word`` ("a red ohwx on a blue background")."""
    pairs = [(c, b) for c in COLOUR_NAMES for b in COLOUR_NAMES if c != b]
    random.Random(seed).shuffle(pairs)
    return [
        Case(prompt(c, word, b), HELD_OUT_SHAPE, c, b, seed * 100003 + 50000 + i)
        for i, (c, b) in enumerate(pairs[i % len(pairs)] for i in range(count))
    ]


def load_pipeline(model: str | Path = BASE_DIR):
    """The toy pipeline (float32 on the CPU, progress bars off), loaded with ``from_pretrained``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_lora(pipe, path: str | Path, strength: float = 1.0) -> None:
    """Load a lorafit LoRA file (kohya or diffusers format) into ``pipe`` at ``strength``.

    Any LoRA loaded earlier by this function is unloaded first, so ``pipe`` holds one at a time.
    """
    from lorafit.networks.loading import load_lora, loaded_loras, unload_lora

    if ADAPTER in loaded_loras(pipe):
        unload_lora(pipe, ADAPTER)
    load_lora(pipe, path, weight=strength, adapter_name=ADAPTER)


def set_lora_strength(pipe, strength: float) -> None:
    """Scale the loaded LoRA (0 = the base model, 1 = as trained)."""
    from lorafit.networks.loading import set_lora_weight

    set_lora_weight(pipe, ADAPTER, strength)


@torch.no_grad()
def generate(
    pipe, cases: Sequence[Case], steps: int = STEPS, guidance: float = GUIDANCE, batch_size: int = 64
) -> np.ndarray:
    """Pictures for ``cases`` as uint8 ``[N, 32, 32, 3]``, each from its case's own seed."""
    pictures = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        out = pipe(
            prompt=[c.prompt for c in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(c.seed) for c in chunk],
            height=RESOLUTION,
            width=RESOLUTION,
            output_type="np",
        ).images
        pictures.append(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(pictures)


def judge_pictures(pictures: np.ndarray, cases: Sequence[Case], judge: Judge | None = None) -> Score:
    """Score already generated ``pictures`` against ``cases``."""
    verdicts = (judge or Judge())(pictures)
    n = len(cases)

    def share(hits) -> float:
        return sum(hits) / n

    return Score(
        count=n,
        shape=share(v.shape == c.shape for v, c in zip(verdicts, cases)),
        colour=share(v.colour == c.colour for v, c in zip(verdicts, cases)),
        background=share(v.background == c.background for v, c in zip(verdicts, cases)),
        accuracy=share(v.shape == c.shape and v.colour == c.colour for v, c in zip(verdicts, cases)),
        held_out=share(v.shape == HELD_OUT_SHAPE for v in verdicts),
        verdicts=tuple(verdicts),
    )


def score(
    pipe, cases: Sequence[Case], judge: Judge | None = None, steps: int = STEPS, guidance: float = GUIDANCE
) -> Score:
    """Generate for ``cases`` and score the pictures."""
    return judge_pictures(generate(pipe, cases, steps, guidance), cases, judge)
