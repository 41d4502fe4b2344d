"""The grid's report: every cell as its own PNG, the labelled sheets, the selection metrics, ``index.html``.

Output folder: ``grid.png`` (or ``grid-NN.png``, one sheet per Z value) with the axis labels drawn
on, every cell with A1111 parameters under ``cells/``, ``index.html`` with the sheets and, given a
CLIP model and the training images, the per-epoch selection metrics, a suggestion and
``selection.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.grid_cells import CellRenderer
from lorafit.inference.grid_plan import AXES, GridPlan
from lorafit.inference.report_html import Report, Table, write_html

log = logging.getLogger("lorafit.grid")


def write_sheets(plan: GridPlan, cells: CellRenderer, out: Path) -> list[tuple[str, Path]]:
    """One labelled sheet per Z value: ``grid.png``, or ``grid-NN.png`` when there are several."""
    xs, ys, zs = (plan.axis_values(a) for a in (plan.x, plan.y, plan.z))
    fixed = [plan.label(a, plan.values[a][0]) for a in AXES if a not in (plan.x, plan.y, plan.z)]
    sheets = []
    for index, (zv, sheet_cells) in enumerate(zip(zs, plan.layout)):
        title = plan.label(plan.z, zv) if plan.z else ""
        image, _ = make_sheet(
            [[cells.images[c] for c in row] for row in sheet_cells],
            [plan.label(plan.x, v) for v in xs] if plan.x else None,
            [plan.label(plan.y, v) for v in ys] if plan.y else None,
            title=", ".join(t for t in [title, *fixed] if t) or None,
        )
        path = out / ("grid.png" if len(zs) == 1 else f"grid-{index:02d}.png")
        image.save(path)
        sheets.append((title or "grid", path))
    return sheets


def write_grid_report(plan: GridPlan, cells: CellRenderer, model: str, out: Path, clip_model: str | None) -> dict:
    """Write cells, sheets, metrics and the HTML page; returns the summary (paths, scores, suggestion)."""
    for cell in cells.images:
        cells.save_cell(cell, out / "cells", model, plan.lbw_index(cell) if cell.lbw is not None else None)
    sheets = write_sheets(plan, cells, out)
    render, hires = cells.render, cells.render.hires
    width, height = render.size(cells.renderer.default_size)
    report = Report(
        title=f"lorafit grid: {len(plan.files)} LoRA file(s) on {Path(model).name or model}",
        sheets=list(sheets),
        settings={
            "model": model,
            "LoRA files": ", ".join(str(f.path) for f in plan.files),
            "axes": f"x={plan.x}, y={plan.y}, z={plan.z}",
            "steps": render.steps,
            "sampler": render.sampler,
            "size": f"{width}x{height}",
            "hires": f"x{hires.scale:g}, denoise {hires.denoise:g}" if hires.scale != 1 else "off",
        },
    )
    summary = {"sheets": [str(p) for _, p in sheets], "cells": len(cells.images)}
    if plan.selection:
        result = plan.selection.score(cells, clip_model, cells.renderer.pipe.device, out)
        report.notes.append(f"Suggested: {result['reason']}")
        report.tables.append(
            Table("Selection metrics per epoch", result["headers"], result["rows"], result["highlight"])
        )
        report.sheets.append(("Flexibility prompts (rows: base model and epochs)", result["sheet"]))
        summary.update({k: result[k] for k in ("scores", "suggested", "reason")})
        (out / "selection.json").write_text(
            json.dumps({k: result[k] for k in ("scores", "suggested", "reason")}, indent=2) + "\n", encoding="utf-8"
        )
        log.info("suggested: %s", result["reason"])
    summary["html"] = str(write_html(report, out / "index.html"))
    log.info("wrote %d sheet(s) and %s", len(sheets), summary["html"])
    return summary
