"""``lorafit grid``: the seeds' XYZ plot over saved epochs, strengths, prompts, seeds and CFG.

    lorafit grid --model sdxl-base --loras runs/dog --prompt "ohwx dog in a park" \\
        --prompt "ohwx dog, watercolor" --strength 0.6 --strength 0.8 --strength 1.0 \\
        --clip_model openai/clip-vit-large-patch14 --train_images data/dog

Every cell uses the same seed(s), so cells differ only by the axis values. Output folder:
``grid.png`` (or ``grid-NN.png``, one sheet per Z value) with the axis labels drawn on, every cell
as its own PNG with A1111 parameters under ``cells/``, and ``index.html`` with the sheets and,
given a CLIP model and the training images, the per-epoch selection metrics and a suggestion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from lorafit.errors import LorafitError
from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.generate import Dtype, load_renderer
from lorafit.inference.grid_cells import Cell, CellRenderer, LoraFile, find_lora_files
from lorafit.inference.prompts import SamplePrompt, parse_prompt_line
from lorafit.inference.render import HiresFix
from lorafit.inference.report_html import Report, Table, write_html
from lorafit.inference.samplers import canonical_sampler
from lorafit.inference.selection import DEFAULT_FLEXIBILITY_PROMPTS
from lorafit.inference.selection_plan import SelectionPlan

log = logging.getLogger("lorafit.grid")

Axis = Literal["epoch", "strength", "prompt", "seed", "cfg"]
AXES = ("epoch", "strength", "prompt", "seed", "cfg")


def _axis_values(files, strengths, prompts, seeds, cfgs) -> dict[str, list]:
    return {
        "epoch": list(range(len(files))),
        "strength": list(strengths),
        "prompt": list(range(len(prompts))),
        "seed": list(seeds),
        "cfg": list(cfgs),
    }


def _axis_label(axis: str, value, files: list[LoraFile], prompts: list[SamplePrompt]) -> str:
    if axis == "epoch":
        return files[value].label
    if axis == "prompt":
        text = prompts[value].prompt
        return text if len(text) <= 120 else text[:117] + "..."
    return {"strength": "strength", "seed": "seed", "cfg": "CFG"}[axis] + f" {value:g}"


def check_axes(x: str | None, y: str | None, z: str | None, values: dict[str, list]) -> None:
    chosen = [a for a in (x, y, z) if a]
    if len(set(chosen)) != len(chosen):
        raise LorafitError(f"--x/--y/--z must name different axes, got {x}, {y}, {z}")
    for axis, items in values.items():
        if not items:
            raise LorafitError(f"grid axis {axis} has no values")
        if len(items) > 1 and axis not in chosen:
            raise LorafitError(f"{axis} has {len(items)} values but is on no axis; set --x, --y or --z to {axis}")


def grid(
    model: str,
    *,
    loras: str | list[str],
    prompt: list[str],
    out: str = "grid",
    x: Axis | None = "epoch",
    y: Axis | None = "strength",
    z: Axis | None = "prompt",
    strength: list[float] = [1.0],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    seed: list[int] = [0],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    cfg: list[float] = [7.0],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    negative_prompt: str = "",
    steps: int = 30,
    width: int | None = None,
    height: int | None = None,
    sampler: str = "euler_a",
    hires_scale: float = 1.0,
    hires_denoise: float = 0.4,
    hires_steps: int | None = None,
    clip_skip: int = 1,
    max_token_length: int | None = None,
    clip_model: str | None = None,
    train_images: str | None = None,
    subject: str | None = None,
    class_word: str | None = None,
    flexibility_prompt: list[str] = list(DEFAULT_FLEXIBILITY_PROMPTS),  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    selection_strength: float = 1.0,
    reference_images: int = 16,
    single_file_config: str | None = None,
    dtype: Dtype = "auto",
    device: str = "auto",
) -> dict:
    """Render an X/Y/Z grid over saved epochs, strengths, prompts, seeds and CFG, with an HTML report.

    Args:
        model: Base model the LoRAs were trained on (diffusers directory, hub id or single file).
        loras: A run folder (uses lora/*-epoch-NNN.safetensors) or a list of LoRA files (the epoch axis).
        prompt: Prompt(s) in kohya inline syntax; repeat --prompt for more (the prompt axis).
        out: Output folder for grid*.png, cells/, index.html and selection.json.
        x: Axis along the columns: epoch, strength, prompt, seed or cfg (empty = none).
        y: Axis along the rows.
        z: One sheet per value of this axis.
        strength: LoRA strength(s) (the strength axis); repeat --strength for more.
        seed: Seed(s) (the seed axis); every cell with the same seed starts from the same noise.
        cfg: CFG scale(s) (the cfg axis).
        negative_prompt: Negative prompt for prompts without their own --n.
        steps: Sampling steps for prompts without their own --s.
        width: Width in pixels; empty = the model's native size.
        height: Height in pixels; empty = like width.
        sampler: Sampler for prompts without their own --ss.
        hires_scale: Hires fix upscale factor for every cell (1 = off).
        hires_denoise: Hires fix denoising strength.
        hires_steps: Hires fix steps; empty = as many as the first pass.
        clip_skip: A1111 clip skip the LoRA was trained with (SD1/SD2).
        max_token_length: Prompt tokens read in 75-token chunks, as the LoRA was trained with
            (kohya's 150/225); empty = 75.
        clip_model: transformers CLIPModel (hub id or directory) for the selection metrics; empty = no metrics.
        train_images: Training images for fidelity: the kohya image folder or a `lorafit prepare` folder.
        subject: Trigger phrase put into the flexibility prompts ("ohwx dog"); empty = the
            training folder's name prompt (10_ohwx dog -> "ohwx dog").
        class_word: Plain word for the subject in CLIP's text ("dog"); empty = from the folder name.
        flexibility_prompt: Prompts placing {subject} in other styles/contexts; repeat for more.
        selection_strength: LoRA strength at which the selection metrics are measured.
        reference_images: At most this many training images are compared against.
        single_file_config: For single-file models offline: a diffusers directory of the same architecture.
        dtype: Weight dtype; auto = float16 on GPU, float32 on CPU.
        device: auto, cpu, cuda, ...
    """
    files = find_lora_files(loras)
    prompts = [parse_prompt_line(p, f"--prompt {i + 1}") for i, p in enumerate(prompt or [])]
    if not prompts:
        raise LorafitError("--prompt: give at least one prompt")
    values = _axis_values(files, strength, prompts, seed, cfg)
    check_axes(x, y, z, values)
    selection = None
    if clip_model:
        if not train_images:
            raise LorafitError("--clip_model needs --train_images (the images fidelity is measured against)")
        selection = SelectionPlan(
            files,
            len(prompts),
            values["seed"],
            values["cfg"][0],
            selection_strength,
            flexibility_prompt,
            subject,
            class_word,
            train_images,
            reference_images,
        )
    hires = HiresFix(hires_scale, hires_denoise, hires_steps)
    renderer = load_renderer(model, device, dtype, clip_skip, single_file_config, max_token_length)
    side = renderer.default_size
    defaults = dict(
        width=width or side,
        height=height or width or side,
        steps=steps,
        sampler=canonical_sampler(sampler, "--sampler"),
        negative_prompt=negative_prompt,
    )
    all_prompts = prompts + (selection.extra_prompts if selection else [])
    cells = CellRenderer(renderer, files, all_prompts, defaults, hires)

    def cell_at(coords: dict) -> Cell:
        pick = {axis: coords.get(axis, values[axis][0]) for axis in AXES}
        return Cell(pick["epoch"], pick["strength"], pick["prompt"], pick["seed"], pick["cfg"])

    xs, ys, zs = (values[a] if a else [None] for a in (x, y, z))
    layout = [[[cell_at({x: xv, y: yv, z: zv}) for xv in xs] for yv in ys] for zv in zs]
    cells.render_all(
        [c for sheet in layout for row in sheet for c in row], selection.cells_by_epoch() if selection else None
    )

    out_dir = Path(out)
    for cell in cells.images:
        cells.save_cell(cell, out_dir / "cells", model)
    sheets = []
    for zi, (zv, sheet_cells) in enumerate(zip(zs, layout)):
        title = _axis_label(z, zv, files, prompts) if z else ""
        fixed = [_axis_label(a, values[a][0], files, prompts) for a in AXES if a not in (x, y, z)]
        image, _ = make_sheet(
            [[cells.images[c] for c in row] for row in sheet_cells],
            [_axis_label(x, v, files, prompts) for v in xs] if x else None,
            [_axis_label(y, v, files, prompts) for v in ys] if y else None,
            title=", ".join(t for t in [title, *fixed] if t) or None,
        )
        path = out_dir / ("grid.png" if len(zs) == 1 else f"grid-{zi:02d}.png")
        image.save(path)
        sheets.append((title or "grid", path))

    report = Report(
        title=f"lorafit grid: {len(files)} LoRA file(s) on {Path(model).name or model}",
        sheets=list(sheets),
        settings={
            "model": model,
            "LoRA files": ", ".join(str(f.path) for f in files),
            "axes": f"x={x}, y={y}, z={z}",
            "steps": steps,
            "sampler": defaults["sampler"],
            "size": f"{defaults['width']}x{defaults['height']}",
            "hires": f"x{hires.scale:g}, denoise {hires.denoise:g}" if hires.scale != 1 else "off",
        },
    )
    summary = {"sheets": [str(p) for _, p in sheets], "cells": len(cells.images)}
    if selection:
        result = selection.score(cells, clip_model, renderer.pipe.device, out_dir)
        report.notes.append(f"Suggested: {result['reason']}")
        report.tables.append(
            Table("Selection metrics per epoch", result["headers"], result["rows"], result["highlight"])
        )
        report.sheets.append(("Flexibility prompts (rows: base model and epochs)", result["sheet"]))
        summary.update({k: result[k] for k in ("scores", "suggested", "reason")})
        (out_dir / "selection.json").write_text(
            json.dumps({k: result[k] for k in ("scores", "suggested", "reason")}, indent=2) + "\n", encoding="utf-8"
        )
        log.info("suggested: %s", result["reason"])
    summary["html"] = str(write_html(report, out_dir / "index.html"))
    log.info("wrote %d sheet(s) and %s", len(sheets), summary["html"])
    return summary
