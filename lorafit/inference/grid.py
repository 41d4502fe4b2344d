"""``lorafit grid``: the seeds' XYZ plot over saved epochs, strengths, block weights, prompts, seeds and CFG.

    lorafit grid --model sdxl-base --lora runs/dog --prompt "ohwx dog in a park" \\
        --prompt "ohwx dog, watercolor" --strength 0.6 --strength 0.8 --strength 1.0 \\
        --clip_model openai/clip-vit-large-patch14 --train_images data/dog

Every cell uses the same seed(s), so cells differ only by the axis values. Three steps:
:func:`~lorafit.inference.grid_plan.plan_grid` checks the inputs and lays the cells out (no model
needed), :class:`~lorafit.inference.grid_cells.CellRenderer` draws them (each LoRA file loaded once),
:func:`~lorafit.inference.grid_report.write_grid_report` writes the cells, the labelled sheets and
``index.html`` (with the per-epoch selection metrics and a suggestion when a CLIP model and the
training images are given).
"""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.inference.generate import load_renderer
from lorafit.inference.grid_cells import CellRenderer, find_lora_files
from lorafit.inference.grid_plan import Axis, check_axes, plan_grid
from lorafit.inference.grid_report import write_grid_report
from lorafit.inference.render_options import BASE_RENAMES, RENDER_RENAMES, BaseModelOptions, RenderOptions

__all__ = ["check_axes", "find_lora_files", "grid"]


def grid(
    model: str,
    *,
    lora: str | list[str],
    prompt: list[str],
    out: str = "grid",
    x: Axis | None = "epoch",
    y: Axis | None = "strength",
    z: Axis | None = "prompt",
    strength: float | list[float] = 1.0,
    lbw: str | list[str] | None = None,
    clip_model: str | None = None,
    train_images: str | None = None,
    subject: str | None = None,
    class_word: str | None = None,
    flexibility_prompt: list[str] | None = None,
    selection_strength: float = 1.0,
    reference_images: int = 16,
    render: RenderOptions = RenderOptions(),
    base: BaseModelOptions = BaseModelOptions(),
) -> dict:
    """Render an X/Y/Z grid over saved epochs, strengths, block weights, prompts, seeds and CFG, with an HTML report.

    Args:
        model: Base model the LoRAs were trained on (diffusers directory, hub id or single file).
        lora: A run folder (uses lora/*-epoch-NNN.safetensors) or LoRA files (the epoch axis);
            repeat --lora for more.
        prompt: Prompt(s) in kohya inline syntax; repeat --prompt for more (the prompt axis).
        out: Output folder for grid*.png, cells/, index.html and selection.json.
        x: Axis along the columns: epoch, strength, prompt, seed, cfg or lbw (empty = none).
        y: Axis along the rows.
        z: One sheet per value of this axis.
        strength: LoRA strength(s) (the strength axis); repeat --strength for more; negative values
            apply the update reversed (sliders: -2 to 2).
        lbw: Block weights (A1111's LoRA Block Weight: a preset such as INALL, a 17/26-value vector,
            SDXL 12/20, or named blocks IN=1,MID=0.5,OUT=0), multiplying the strength per block
            (the lbw axis); repeat --lbw for more; empty = every block at the strength.
        clip_model: transformers CLIPModel (hub id or directory) for the selection metrics; empty = no metrics.
        train_images: Training images for fidelity: the kohya image folder or a `lorafit prepare` folder.
        subject: Trigger phrase put into the flexibility prompts ("ohwx dog"); empty = the
            training folder's name prompt (10_ohwx dog -> "ohwx dog").
        class_word: Plain word for the subject in CLIP's text ("dog"); empty = from the folder name.
        flexibility_prompt: Prompts placing {subject} in other styles/contexts; repeat for more;
            empty = six built-in ones (a watercolor painting of {subject}, a pencil sketch, the
            moon, a snowy forest at night, pixel art, a low-poly render).
        selection_strength: LoRA strength at which the selection metrics are measured.
        reference_images: At most this many training images are compared against.
        render: How each cell is drawn; several --render.seed / --render.cfg values are the seed
            and cfg axes.
        base: Where the base model is loaded (device, dtype, single-file config).
    """
    selection = None
    if clip_model:
        if not train_images:
            raise LorafitError("--clip_model needs --train_images (the images fidelity is measured against)")
        selection = dict(
            strength=selection_strength,
            flexibility_prompt=flexibility_prompt,
            subject=subject,
            class_word=class_word,
            train_images=train_images,
            reference_images=reference_images,
        )
    plan = plan_grid(lora, prompt, x, y, z, strength, lbw, render, selection)
    renderer = load_renderer(model, base, render)
    prompts = plan.prompts + (plan.selection.extra_prompts if plan.selection else [])
    cells = CellRenderer(renderer, plan.files, prompts, render)
    cells.render_all(plan.cells, plan.selection.cells_by_epoch() if plan.selection else None)
    return write_grid_report(plan, cells, model, Path(out), clip_model)


grid.renamed_flags = {**RENDER_RENAMES, **BASE_RENAMES, "--loras": "--lora"}
