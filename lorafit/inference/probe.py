"""``lorafit probe``: "do you actually need a LoRA?" (seed 000), answered before any training.

    lorafit probe --model sdxl-base --data data/kitsune --phrasing kitsune \\
        --description "a woman with fox ears and a fox tail" --clip_model openai/clip-vit-large-patch14

Draws base-model images for a few of the dataset's own captions, for each synonym and each visual
description, lays them out under sample training images (``probe.png``), scores how close they
come with CLIP and prints one of the four verdicts with the numbers behind it (the scale and
thresholds are explained in :mod:`lorafit.inference.probe_verdict`). Also writes ``index.html``
and ``probe.json``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from lorafit.errors import LorafitError
from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.generate import Dtype, load_renderer
from lorafit.inference.png_info import a1111_parameters, save_png
from lorafit.inference.probe_verdict import PhrasingScore, Thresholds, decide
from lorafit.inference.prompts import parse_prompt_line
from lorafit.inference.reference_images import load_reference_set
from lorafit.inference.report_html import Report, Table, write_html
from lorafit.inference.samplers import canonical_sampler

log = logging.getLogger("lorafit.probe")


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


def probe(
    model: str,
    *,
    data: str,
    phrasing: list[str] = [],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    description: list[str] = [],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    captions: int = 3,
    seed: list[int] = [0, 1, 2, 3],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    clip_model: str | None = None,
    control_prompt: str = "a photograph of an empty room",
    negative_prompt: str = "",
    steps: int = 30,
    cfg: float = 7.0,
    sampler: str = "euler_a",
    width: int | None = None,
    height: int | None = None,
    good: float = 0.8,
    close: float = 0.5,
    consistent: float = 0.75,
    reference_images: int = 16,
    clip_skip: int = 1,
    max_token_length: int | None = None,
    out: str = "probe",
    single_file_config: str | None = None,
    dtype: Dtype = "auto",
    device: str = "auto",
) -> dict:
    """Show what the base model draws for the concept's captions, synonyms and descriptions, and judge it.

    Args:
        model: Base model to probe (diffusers directory, hub id or single file).
        data: The concept's images and captions: a kohya image folder or a `lorafit prepare` folder
            (or a .txt file of captions, one per line: images only, no scores).
        phrasing: Synonym or related name to try as a prompt ("infinity symbol" for "lemniscate");
            repeat for more.
        description: Visual description to try ("a woman with fox ears and a fox tail"); repeat for more.
        captions: How many of the dataset's own captions to try as prompts.
        seed: Seeds; every phrasing is drawn once per seed (consistency needs several).
        clip_model: transformers CLIPModel (hub id or directory) for scores and the verdict; empty =
            images only.
        control_prompt: An unrelated prompt; its images anchor "not the concept" (closeness 0).
        negative_prompt: Negative prompt for every image.
        steps: Sampling steps.
        cfg: CFG scale.
        sampler: Sampler (euler, euler_a, dpmpp_2m, ddim, ...).
        width: Width in pixels; empty = the model's native size.
        height: Height in pixels; empty = like width.
        good: Closeness from which an image counts as showing the concept.
        close: Mean closeness from which a phrasing "gets close".
        consistent: Share of seeds that must be good for "already performs well".
        reference_images: At most this many training images are compared against.
        clip_skip: A1111 clip skip (SD1/SD2) to draw with.
        max_token_length: Prompt tokens read in 75-token chunks, as the LoRA was trained with
            (kohya's 150/225); empty = 75.
        out: Output folder for probe.png, images/, index.html and probe.json.
        single_file_config: For single-file models offline: a diffusers directory of the same architecture.
        dtype: Weight dtype; auto = float16 on GPU, float32 on CPU.
        device: auto, cpu, cuda, ...
    """
    reference = load_reference_set(data, reference_images, key="--data")
    if clip_model and not reference.images:
        raise LorafitError(
            f"--data {data} holds captions only; scores compare with training images, so give "
            "the image folder (or drop --clip_model to only look at the images)"
        )
    thresholds = Thresholds(good=good, close=close, consistent=consistent)
    seeds = list(seed)
    if not seeds:
        raise LorafitError("--seed: give at least one seed")
    tried = _phrasings(reference.captions, captions, list(phrasing), list(description), seeds[0])
    if not tried:
        raise LorafitError(f"--data {data}: no captions found; add --phrasing or --description prompts")
    tried.append(("control", control_prompt))
    renderer = load_renderer(model, device, dtype, clip_skip, single_file_config, max_token_length)
    side = renderer.default_size
    w, h = width or side, height or width or side
    sampler = canonical_sampler(sampler, "--sampler")
    out_dir = Path(out)

    images: list[list[Image.Image]] = []
    for row, (kind, text) in enumerate(tried):
        prompt = parse_prompt_line(text, f"--{kind}")
        row_images = []
        for image_seed in seeds:
            request = replace(
                prompt, negative_prompt=prompt.negative_prompt or negative_prompt, seed=None
            ).with_defaults(w, h, steps, cfg, image_seed, sampler)
            image = renderer(request)
            save_png(
                image, out_dir / "images" / f"{row:02d}-{kind}-seed{image_seed}.png", a1111_parameters(request, model)
            )
            row_images.append(image)
        images.append(row_images)

    references = [ImageOps.fit(im, (w, h), Image.LANCZOS) for im in reference.images[: len(seeds)]]
    report = Report(
        title=f"lorafit probe: does {Path(model).name or model} already know the concept?",
        settings={
            "model": model,
            "data": data,
            "seeds": ", ".join(map(str, seeds)),
            "steps": steps,
            "cfg": cfg,
            "sampler": sampler,
            "size": f"{w}x{h}",
        },
    )
    summary: dict = {"phrasings": [{"kind": k, "prompt": t} for k, t in tried]}
    labels = [f"{kind}: {text}" for kind, text in tried]
    if clip_model:
        verdict, scores = _score(reference, tried, images, clip_model, renderer.pipe.device, thresholds)
        labels = [f"{label} (closeness {s.mean_closeness:.2f})" for label, s in zip(labels, scores)]
        report.notes += [f"Verdict: {verdict.title}. {verdict.advice}.", verdict.explanation]
        report.tables.append(
            Table(
                "Closeness per phrasing (0 = like the control prompt, 1 = like the training images)",
                ["phrasing", "kind", "mean similarity", "mean closeness", f"seeds >= {good:g}"],
                [
                    [
                        s.prompt,
                        s.kind,
                        sum(s.similarities) / len(s.similarities),
                        s.mean_closeness,
                        f"{s.hit_rate(good):.0%}",
                    ]
                    for s in scores
                ],
                highlight=scores.index(verdict.best) if verdict.best in scores else None,
            )
        )
        summary.update(
            verdict=verdict.key,
            title=verdict.title,
            advice=verdict.advice,
            explanation=verdict.explanation,
            floor=verdict.floor,
            ceiling=verdict.ceiling,
            scores=[{**vars(s), "mean_closeness": s.mean_closeness} for s in scores],
        )
        lines = [f"verdict: {verdict.title}", f"  what to do: {verdict.advice}", f"  {verdict.explanation}"]
        lines += [
            f"  {s.kind:<11} similarity {sum(s.similarities) / len(s.similarities):6.3f}  closeness "
            f"{s.mean_closeness:6.2f}  {s.hit_rate(good):4.0%} good  {s.prompt}"
            for s in scores
        ]
    else:
        lines = [
            (
                f"no --clip_model: compare the rows of {out_dir / 'probe.png'} with the training images by eye "
                "(pass --clip_model for scores and a verdict)"
            )
        ]
    rows, row_labels = ([references], ["training images"]) if references else ([], [])
    sheet, _ = make_sheet(
        [*rows, *images],
        [f"seed {s}" for s in seeds],
        [*row_labels, *labels],
        title="base model images per phrasing, under sample training images",
    )
    sheet_path = out_dir / "probe.png"
    sheet.save(sheet_path)
    report.sheets.append(("Training images (top row) and the base model's images per phrasing", sheet_path))
    summary["html"] = str(write_html(report, out_dir / "index.html"))
    (out_dir / "probe.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return summary


def _score(reference, tried, images, clip_model, device, thresholds):
    from lorafit.inference.clip_scores import ClipScorer

    scorer = ClipScorer(clip_model, device)
    ceiling = scorer.pairwise_similarity(reference.images)
    scores = [
        PhrasingScore(kind, text, scorer.similarity_to_set(row, reference.images))
        for (kind, text), row in zip(tried, images)
    ]
    verdict = decide(scores[:-1], scores[-1], ceiling, thresholds)
    return verdict, scores
