"""Measure what the toy Flux pipeline draws: :mod:`lorafit.toyworld.evaluate` for ``base_flux``.

The prompts, seeds, judge and scores are the SD toy base's (:mod:`~lorafit.toyworld.evaluate`),
so the two bases and their demo LoRAs are measured the same way; what differs is the pipeline and
how it samples:

    from lorafit.toyworld import flux_evaluate as fev
    pipe = fev.load_pipeline()                                   # lorafit/toyworld/base_flux
    fev.apply_lora(pipe, "runs/demo-flux/lora/ohwx-flux-epoch-008.safetensors", strength=1.0)
    print(fev.score(pipe, fev.trigger_cases(64)).held_out)       # share of pictures that show a star

Sampling: FluxPipeline's Euler on Flux's shifted sigmas, 20 steps, true classifier-free guidance 4
against the empty prompt (the toy base has no guidance embedding, see
:mod:`lorafit.toyworld.flux_architecture`), and T5 reads the 16 tokens the base was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lorafit.toyworld.evaluate import (  # noqa: F401  (the shared measurement, re-exported)
    Case,
    Score,
    apply_lora,
    in_world_cases,
    judge_pictures,
    set_lora_strength,
    trigger_cases,
)
from lorafit.toyworld.flux_architecture import SEQUENCE_LENGTH
from lorafit.toyworld.judge import Judge
from lorafit.toyworld.world import RESOLUTION

BASE_DIR = Path(__file__).parent / "base_flux"
FAMILY = "flux"

# Sampling settings the reported numbers use.
SAMPLER = "Euler (FlowMatchEulerDiscreteScheduler)"
STEPS = 20
GUIDANCE = 4.0  # true classifier-free guidance against the empty prompt; 1 = none


def load_pipeline(model: str | Path = BASE_DIR):
    """The toy Flux pipeline (float32 on the CPU, progress bars off), loaded with ``from_pretrained``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe, cases: Sequence[Case], steps: int = STEPS, guidance: float = GUIDANCE, batch_size: int = 64
) -> np.ndarray:
    """Pictures for ``cases`` as uint8 ``[N, 32, 32, 3]``, each from its case's own seed."""
    pictures = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        cfg = dict(negative_prompt=[""] * len(chunk), true_cfg_scale=guidance) if guidance > 1 else {}
        out = pipe(
            prompt=[c.prompt for c in chunk],
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(c.seed) for c in chunk],
            height=RESOLUTION,
            width=RESOLUTION,
            max_sequence_length=SEQUENCE_LENGTH,
            output_type="np",
            **cfg,
        ).images
        pictures.append(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(pictures)


def score(
    pipe, cases: Sequence[Case], judge: Judge | None = None, steps: int = STEPS, guidance: float = GUIDANCE
) -> Score:
    """Generate for ``cases`` and score the pictures."""
    return judge_pictures(generate(pipe, cases, steps, guidance), cases, judge)
