"""The probe's plan: which phrasings it draws (captions of the dataset, synonyms, descriptions, the
control prompt), decided from the dataset before a model loads."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.inference.prompts import SamplePrompt, parse_prompt_line
from lorafit.inference.reference_images import ReferenceSet, load_reference_set
from lorafit.inference.render_options import RenderOptions


def _phrasings(
    captions: list[str], count: int, synonyms: list[str], descriptions: list[str], seed: int
) -> list[tuple[str, str]]:
    unique = list(dict.fromkeys(c for c in captions if c.strip()))
    picked = unique if len(unique) <= count else random.Random(seed).sample(unique, count)
    return (
        [("caption", c) for c in picked]
        + [("synonym", s) for s in synonyms]
        + [("description", d) for d in descriptions]
    )


@dataclass(frozen=True)
class ProbePlan:
    """What the probe draws: each phrasing (kind, text; the control prompt last) at every seed."""

    data: str
    reference: ReferenceSet
    tried: list[tuple[str, str]]
    prompts: list[SamplePrompt]
    render: RenderOptions


def plan_probe(
    data: str,
    phrasing: list[str],
    description: list[str],
    captions: int,
    control_prompt: str,
    reference_images: int,
    render: RenderOptions,
    scored: bool,
) -> ProbePlan:
    """Read the dataset and choose the phrasings (no model needed): a wrong folder fails in seconds."""
    reference = load_reference_set(data, reference_images, key="--data")
    if scored and not reference.images:
        raise LorafitError(
            f"--data {data} holds captions only; scores compare with training images, so give "
            "the image folder (or drop --clip_model to only look at the images)"
        )
    tried = _phrasings(reference.captions, captions, list(phrasing), list(description), render.seeds[0])
    if not tried:
        raise LorafitError(f"--data {data}: no captions found; add --phrasing or --description prompts")
    tried.append(("control", control_prompt))
    prompts = [parse_prompt_line(text, f"--{kind}") for kind, text in tried]
    return ProbePlan(data, reference, tried, prompts, render)
