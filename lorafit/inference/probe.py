"""``lorafit probe``: "do you actually need a LoRA?" (seed 000), answered before any training.

    lorafit probe --model sdxl-base --data data/kitsune --phrasing kitsune \\
        --description "a woman with fox ears and a fox tail" --clip_model openai/clip-vit-large-patch14

Draws base-model images for a few of the dataset's own captions, for each synonym and each visual
description, lays them out under sample training images (``probe.png``), scores how close they
come with CLIP and prints one of the four verdicts with the numbers behind it (the scale and
thresholds are explained in :mod:`lorafit.inference.probe_verdict`). Also writes ``index.html``
and ``probe.json``. Three steps: :func:`~lorafit.inference.probe_plan.plan_probe` (the phrasings,
checked before a model loads), :func:`draw_phrasings`, and
:func:`~lorafit.inference.probe_report.write_probe_report`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from lorafit.inference.generate import load_renderer
from lorafit.inference.png_info import a1111_parameters, save_png
from lorafit.inference.probe_plan import ProbePlan, plan_probe
from lorafit.inference.probe_report import write_probe_report
from lorafit.inference.probe_verdict import Thresholds
from lorafit.inference.progress import image_progress
from lorafit.inference.render import Renderer
from lorafit.inference.render_options import BASE_RENAMES, RENDER_RENAMES, BaseModelOptions, RenderOptions


def draw_phrasings(plan: ProbePlan, renderer: Renderer, model: str, out: Path) -> list[list[Image.Image]]:
    """One row of images per phrasing, one per seed (and CFG), each also saved under ``images/``."""
    render = plan.render
    hires = render.hires
    columns = [(seed, cfg) for cfg in render.cfgs for seed in render.seeds]
    images = []
    with image_progress(len(plan.prompts) * len(columns), "probe") as bar:
        for row, ((kind, _), prompt) in enumerate(zip(plan.tried, plan.prompts)):
            row_images = []
            for seed, cfg in columns:
                # Every phrasing at the probe's seeds: a prompt's own --d would leave nothing to compare.
                request = render.fill(replace(prompt, seed=None), renderer.default_size, seed, cfg)
                image = renderer(request, hires)
                suffix = f"-seed{seed}" + (f"-cfg{cfg:g}" if len(render.cfgs) > 1 else "")
                parameters = a1111_parameters(request, model, (), hires.scale, hires.denoise, hires.steps)
                save_png(image, out / "images" / f"{row:02d}-{kind}{suffix}.png", parameters)
                row_images.append(image)
                bar.update()
            images.append(row_images)
    return images


def probe(
    model: str,
    *,
    data: str,
    phrasing: list[str] | None = None,
    description: list[str] | None = None,
    captions: int = 3,
    clip_model: str | None = None,
    control_prompt: str = "a photograph of an empty room",
    good: float = 0.8,
    close: float = 0.5,
    consistent: float = 0.75,
    reference_images: int = 16,
    out: str = "probe",
    render: RenderOptions = RenderOptions(seed=(0, 1, 2, 3)),
    base: BaseModelOptions = BaseModelOptions(),
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
        clip_model: transformers CLIPModel (hub id or directory) for scores and the verdict; empty =
            images only.
        control_prompt: An unrelated prompt; its images anchor "not the concept" (closeness 0).
        good: Closeness from which an image counts as showing the concept.
        close: Mean closeness from which a phrasing "gets close".
        consistent: Share of seeds that must be good for "already performs well".
        reference_images: At most this many training images are compared against.
        out: Output folder for probe.png, images/, index.html and probe.json.
        render: How each image is drawn; every phrasing is drawn once per seed (consistency needs
            several: the default is seeds 0 to 3).
        base: Where the base model is loaded (device, dtype, single-file config).
    """
    thresholds = Thresholds(good=good, close=close, consistent=consistent)
    plan = plan_probe(
        data, phrasing or [], description or [], captions, control_prompt, reference_images, render, bool(clip_model)
    )
    renderer = load_renderer(model, base, render)
    out_dir = Path(out)
    images = draw_phrasings(plan, renderer, model, out_dir)
    return write_probe_report(plan, images, model, renderer, clip_model, thresholds, out_dir)


probe.renamed_flags = {**RENDER_RENAMES, **BASE_RENAMES}
