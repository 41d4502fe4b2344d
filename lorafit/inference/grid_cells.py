"""The grid's cells and their rendering: the LoRA files of the epoch axis, one cell per image, and a
renderer that loads each file once and caches every image by its cell (shared by the grid and the
selection metrics, :mod:`lorafit.inference.selection_plan`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lorafit.errors import LorafitError
from lorafit.inference.png_info import AppliedLora, a1111_parameters, save_png
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.render import HiresFix, Renderer

_NUMBERED = re.compile(r"-(epoch|step)-(\d+)$")


@dataclass(frozen=True)
class LoraFile:
    label: str
    path: Path


def _label(path: Path) -> str:
    match = _NUMBERED.search(path.stem)
    return f"{match.group(1)} {int(match.group(2))}" if match else path.stem


def _run_files(root: Path, given: str) -> list[LoraFile]:
    folder = root / "lora" if (root / "lora").is_dir() else root
    for kind in ("epoch", "step"):
        files = [p for p in folder.glob(f"*-{kind}-*.safetensors") if _NUMBERED.search(p.stem)]
        if files:
            files.sort(key=lambda p: int(_NUMBERED.search(p.stem).group(2)))
            return [LoraFile(_label(p), p) for p in files]
    raise LorafitError(f"--loras {given}: no *-epoch-NNN.safetensors or *-step-NNNNNN.safetensors files in {folder}")


def find_lora_files(loras: str | list[str]) -> list[LoraFile]:
    """The epoch axis: each run folder's per-epoch kohya files (``lora/*-epoch-NNN.safetensors``,
    else its step files) and each file given, in the order given."""
    items = [loras] if isinstance(loras, str) else list(loras)
    if not items:
        raise LorafitError("--loras: give a run folder or LoRA files")
    result = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            result += _run_files(path, item)
        elif path.is_file():
            result.append(LoraFile(_label(path), path))
        else:
            raise LorafitError(f"--loras: {item} does not exist")
    return result


@dataclass(frozen=True)
class Cell:
    """One image of the grid: indices into the epoch and prompt lists, and the numeric settings."""

    epoch: int | None  # None = the base model without any LoRA
    strength: float
    prompt: int
    seed: int
    cfg: float


class CellRenderer:
    """Renders cells, loading each LoRA file once and caching every image by its cell."""

    def __init__(
        self,
        renderer: Renderer,
        files: list[LoraFile],
        prompts: list[SamplePrompt],
        defaults: dict,
        hires: HiresFix | None,
    ):
        self.renderer, self.files, self.prompts = renderer, files, prompts
        self.defaults, self.hires = defaults, hires
        self.images: dict[Cell, Image.Image] = {}
        self.requests: dict[Cell, SamplePrompt] = {}

    def request(self, cell: Cell) -> SamplePrompt:
        d = self.defaults
        prompt = self.prompts[cell.prompt]
        filled = prompt.with_defaults(d["width"], d["height"], d["steps"], cell.cfg, cell.seed, d["sampler"])
        # The grid's seed and CFG axes win over a prompt's own --d/--l: each cell differs by its axes only.
        return SamplePrompt(
            filled.prompt,
            filled.negative_prompt or d["negative_prompt"],
            filled.width,
            filled.height,
            filled.steps,
            cell.cfg,
            cell.seed,
            filled.sampler,
        )

    def render_all(self, cells: list[Cell], extra: dict[int | None, list[Cell]] | None = None) -> None:
        from lorafit.networks.loading import load_lora, set_lora_weight, unload_lora

        wanted = list(dict.fromkeys(cells + [c for group in (extra or {}).values() for c in group]))
        for epoch in sorted({c.epoch for c in wanted}, key=lambda e: -1 if e is None else e):
            todo = [c for c in wanted if c.epoch == epoch and c not in self.images]
            if not todo:
                continue
            name = None
            if epoch is not None:
                name = load_lora(self.renderer.pipe, self.files[epoch].path, adapter_name=f"grid_epoch_{epoch}")
            try:
                for cell in todo:
                    if name:
                        set_lora_weight(self.renderer.pipe, name, cell.strength)
                    self.requests[cell] = self.request(cell)
                    self.images[cell] = self.renderer(self.requests[cell], self.hires)
            finally:
                if name:
                    unload_lora(self.renderer.pipe, name)

    def save_cell(self, cell: Cell, folder: Path, model: str) -> Path:
        lora = [] if cell.epoch is None else [AppliedLora(str(self.files[cell.epoch].path), cell.strength)]
        hires = self.hires or HiresFix(1.0)
        label = "base" if cell.epoch is None else re.sub(r"\W+", "-", self.files[cell.epoch].label)
        name = f"{label}_s{cell.strength:g}_p{cell.prompt:02d}_seed{cell.seed}_cfg{cell.cfg:g}.png"
        return save_png(
            self.images[cell],
            folder / name,
            a1111_parameters(self.requests[cell], model, lora, hires.scale, hires.denoise, hires.steps),
        )
