"""The grid's cells and their rendering: the LoRA files of the epoch axis, one cell per image, and a
renderer that loads each file once and caches every image by its cell (shared by the grid and the
selection metrics, :mod:`lorafit.inference.selection_plan`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from lorafit.errors import LorafitError
from lorafit.inference.lora_specs import split_lora_spec
from lorafit.inference.png_info import AppliedLora, a1111_parameters, save_png
from lorafit.inference.progress import image_progress
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.render import Renderer
from lorafit.inference.render_options import RenderOptions

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
    raise LorafitError(f"--lora {given}: no *-epoch-NNN.safetensors or *-step-NNNNNN.safetensors files in {folder}")


def find_lora_files(loras: str | list[str]) -> list[LoraFile]:
    """The epoch axis: each run folder's per-epoch kohya files (``lora/*-epoch-NNN.safetensors``,
    else its step files) and each file given, in the order given."""
    items = [loras] if isinstance(loras, str) else list(loras)
    if not items:
        raise LorafitError("--lora: give a run folder or LoRA files")
    result = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            _, strength, blocks = split_lora_spec(item)
            if strength is not None or blocks is not None:
                raise LorafitError(
                    f"--lora {item}: grid puts strengths and block weights on axes of their own; "
                    "give the file alone and use --strength / --lbw"
                )
        if path.is_dir():
            result += _run_files(path, item)
        elif path.is_file():
            result.append(LoraFile(_label(path), path))
        else:
            raise LorafitError(f"--lora: {item} does not exist")
    return result


@dataclass(frozen=True)
class Cell:
    """One image of the grid: indices into the epoch and prompt lists, and the numeric settings."""

    epoch: int | None  # None = the base model without any LoRA
    strength: float
    prompt: int
    seed: int
    cfg: float
    lbw: str | None = None  # block weights (A1111 LBW spec); None = the strength on every block


class CellRenderer:
    """Renders cells, loading each LoRA file once and caching every image by its cell."""

    def __init__(self, renderer: Renderer, files: list[LoraFile], prompts: list[SamplePrompt], render: RenderOptions):
        self.renderer, self.files, self.prompts, self.render = renderer, files, prompts, render
        self.images: dict[Cell, Image.Image] = {}
        self.requests: dict[Cell, SamplePrompt] = {}

    def request(self, cell: Cell) -> SamplePrompt:
        # The grid's seed and CFG axes win over a prompt's own --d/--l: each cell differs by its axes only.
        prompt = self.prompts[cell.prompt]
        return self.render.fill(
            prompt, self.renderer.default_size, cell.seed, cell.cfg, force_seed=True, force_cfg=True
        )

    def render_all(self, cells: list[Cell], extra: dict[int | None, list[Cell]] | None = None) -> None:
        from lorafit.inference.embeddings import load_lora_or_embedding, unload
        from lorafit.networks.loading import set_block_weights, set_lora_weight

        wanted = list(dict.fromkeys(cells + [c for group in (extra or {}).values() for c in group]))
        todo = [c for c in wanted if c not in self.images]
        hires = self.render.hires
        with image_progress(len(todo), "grid") as bar:
            for epoch in sorted({c.epoch for c in todo}, key=lambda e: -1 if e is None else e):
                name, blocks, embeddings = None, None, {}
                if epoch is not None:  # a pivotal-tuning file brings its embeddings (embeddings.py)
                    name, embeddings = load_lora_or_embedding(
                        self.renderer.pipe, self.files[epoch].path, adapter_name=f"grid_epoch_{epoch}"
                    )
                try:
                    for cell in (c for c in todo if c.epoch == epoch):
                        if name and cell.lbw != blocks:
                            set_block_weights(self.renderer.pipe, name, cell.lbw)
                            blocks = cell.lbw
                        if name:
                            set_lora_weight(self.renderer.pipe, name, cell.strength)
                        self.requests[cell] = self.request(cell)
                        self.images[cell] = self.renderer(self.requests[cell], hires)
                        bar.update()
                finally:
                    unload(self.renderer.pipe, name, embeddings)

    def applied(self, cell: Cell) -> list[AppliedLora]:
        """The LoRA of ``cell`` as its PNG records it (block weights as A1111's extension reads them)."""
        if cell.epoch is None:
            return []
        lora = AppliedLora(str(self.files[cell.epoch].path), cell.strength)
        if cell.lbw is None:
            return [lora]
        from lorafit.networks.block_weights import parse_block_weights

        return [replace(lora, block_weights=parse_block_weights(cell.lbw, self.renderer.base.family).a1111())]

    def save_cell(self, cell: Cell, folder: Path, model: str, lbw_index: int | None = None) -> Path:
        hires = self.render.hires
        label = "base" if cell.epoch is None else re.sub(r"\W+", "-", self.files[cell.epoch].label)
        blocks = "" if lbw_index is None else f"_lbw{lbw_index:02d}"
        name = f"{label}_s{cell.strength:g}{blocks}_p{cell.prompt:02d}_seed{cell.seed}_cfg{cell.cfg:g}.png"
        return save_png(
            self.images[cell],
            folder / name,
            a1111_parameters(self.requests[cell], model, self.applied(cell), hires.scale, hires.denoise, hires.steps),
        )
