"""The grid's plan: its axes, the cell of every sheet position, and the selection metrics' plan.

Everything here is decided from what the user gave, before a model loads: a wrong folder, axis or
block-weight spec fails in seconds, not after the first minutes of rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorafit.errors import LorafitError
from lorafit.inference.grid_cells import Cell, LoraFile, find_lora_files
from lorafit.inference.prompts import SamplePrompt, parse_prompt_line
from lorafit.inference.render_options import RenderOptions
from lorafit.inference.selection import DEFAULT_FLEXIBILITY_PROMPTS
from lorafit.inference.selection_plan import SelectionPlan
from lorafit.networks.block_weights import check_block_weights

Axis = Literal["epoch", "strength", "prompt", "seed", "cfg", "lbw"]
AXES = ("epoch", "strength", "prompt", "seed", "cfg", "lbw")


def check_axes(x: str | None, y: str | None, z: str | None, values: dict[str, list]) -> None:
    chosen = [a for a in (x, y, z) if a]
    if len(set(chosen)) != len(chosen):
        raise LorafitError(f"--x/--y/--z must name different axes, got {x}, {y}, {z}")
    for axis, items in values.items():
        if not items:
            raise LorafitError(f"grid axis {axis} has no values")
        if len(items) > 1 and axis not in chosen:
            raise LorafitError(f"{axis} has {len(items)} values but is on no axis; set --x, --y or --z to {axis}")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class GridPlan:
    """What the grid draws: the files, prompts and axis values, and which cell sits where.

    Attributes:
        files: The epoch axis.
        prompts: The grid's prompts (the prompt axis).
        values: Axis name -> its values (``epoch`` and ``prompt`` as indices into the lists above).
        x, y, z: The axis along columns, rows and sheets (None = not used).
        layout: ``layout[sheet][row][column]`` is a :class:`Cell`.
        selection: The selection metrics' plan, when a CLIP model is given.
    """

    files: list[LoraFile]
    prompts: list[SamplePrompt]
    values: dict[str, list]
    x: str | None
    y: str | None
    z: str | None
    layout: list[list[list[Cell]]]
    selection: SelectionPlan | None

    @property
    def cells(self) -> list[Cell]:
        return [cell for sheet in self.layout for row in sheet for cell in row]

    def axis_values(self, axis: str | None) -> list:
        return self.values[axis] if axis else [None]

    def label(self, axis: str, value) -> str:
        """The text drawn beside a row/column (or above a sheet) for one axis value."""
        if axis == "epoch":
            return self.files[value].label
        if axis == "prompt":
            text = self.prompts[value].prompt
            return text if len(text) <= 120 else text[:117] + "..."
        if axis == "lbw":
            return "" if value is None else f"lbw {value}"
        return {"strength": "strength", "seed": "seed", "cfg": "CFG"}[axis] + f" {value:g}"

    def lbw_index(self, cell: Cell) -> int | None:
        """Position of the cell's block weights among the lbw values (None when the grid sets none)."""
        return None if self.values["lbw"] == [None] else self.values["lbw"].index(cell.lbw)


def plan_grid(
    lora: str | list[str],
    prompt: list[str],
    x: str | None,
    y: str | None,
    z: str | None,
    strength: float | list[float],
    lbw: str | list[str] | None,
    render: RenderOptions,
    selection: dict | None,
) -> GridPlan:
    """Check the inputs and lay the cells out; ``selection`` holds the selection-metric arguments (or None)."""
    files = find_lora_files(lora)
    prompts = [parse_prompt_line(p, f"--prompt {i + 1}") for i, p in enumerate(prompt or [])]
    if not prompts:
        raise LorafitError("--prompt: give at least one prompt")
    blocks = [None] if lbw is None else _as_list(lbw)
    for spec in blocks:
        if spec is not None:
            check_block_weights(spec, "--lbw")
    values = {
        "epoch": list(range(len(files))),
        "strength": [float(s) for s in _as_list(strength)],
        "prompt": list(range(len(prompts))),
        "seed": list(render.seeds),
        "cfg": list(render.cfgs),
        "lbw": blocks,
    }
    check_axes(x, y, z, values)
    metrics = None
    if selection is not None:
        metrics = SelectionPlan(
            files,
            len(prompts),
            values["seed"],
            values["cfg"][0],
            selection["strength"],
            selection["flexibility_prompt"] or list(DEFAULT_FLEXIBILITY_PROMPTS),
            selection["subject"],
            selection["class_word"],
            selection["train_images"],
            selection["reference_images"],
            values["lbw"][0],
        )

    def cell_at(coords: dict) -> Cell:
        pick = {axis: coords.get(axis, values[axis][0]) for axis in AXES}
        return Cell(pick["epoch"], pick["strength"], pick["prompt"], pick["seed"], pick["cfg"], pick["lbw"])

    xs, ys, zs = (values[a] if a else [None] for a in (x, y, z))
    layout = [[[cell_at({x: xv, y: yv, z: zv}) for xv in xs] for yv in ys] for zv in zs]
    return GridPlan(files, prompts, values, x, y, z, layout, metrics)
