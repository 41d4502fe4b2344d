"""The images the selection metrics need, per epoch, and their scoring into the grid's report.

For the base model and every LoRA file: the grid's prompts (fidelity) and the flexibility prompts,
each at every grid seed, at ``selection_strength``. They are rendered by the grid's
:class:`~lorafit.inference.grid_cells.CellRenderer` in the same pass as the grid cells (each LoRA file
loaded once; a cell that is also in the grid is rendered once).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.prompts import SamplePrompt, parse_prompt_line
from lorafit.inference.reference_images import load_reference_set
from lorafit.inference.selection import (
    EpochScore,
    fidelity_score,
    flexibility_prompts,
    flexibility_score,
    suggest_epoch,
)


class SelectionPlan:
    """Which cells to render for the metrics, and how to score them.

    Args:
        files: The LoRA files (epoch axis), objects with ``label``.
        prompt_count: Number of grid prompts; flexibility prompts are appended after them.
        seeds: Seeds every metric image is rendered at.
        cfg: CFG scale of the metric images.
        strength: LoRA strength of the metric images.
        templates: Flexibility prompt templates with ``{subject}``.
        subject: Trigger phrase; empty = from the training folder's name.
        class_word: Plain class word for CLIP's text; empty = from the training folder's name.
        train_images: Training image folder or prepared dataset folder.
        reference_limit: At most this many training images.
        lbw: Block weights of the metric images (the grid's first ``--lbw`` value); None = none.
    """

    def __init__(
        self,
        files: Sequence,
        prompt_count: int,
        seeds: Sequence[int],
        cfg: float,
        strength: float,
        templates: Sequence[str],
        subject: str | None,
        class_word: str | None,
        train_images: str,
        reference_limit: int,
        lbw: str | None = None,
    ):
        # Loaded before any rendering, so a wrong folder fails in seconds, not after the grid.
        self.reference = load_reference_set(train_images, reference_limit)
        subject = subject or self.reference.subject
        if not subject and any("{subject}" in t for t in templates):
            raise LorafitError(
                "--subject: the training folder name gives no trigger phrase (no '10_ohwx dog' "
                "folder); pass --subject 'ohwx dog' for the flexibility prompts"
            )
        pairs = flexibility_prompts(templates, subject or "", class_word or self.reference.class_word)
        if not pairs:
            raise LorafitError("--flexibility_prompt: give at least one prompt")
        self.files, self.seeds, self.cfg, self.strength = list(files), list(seeds), cfg, strength
        self.lbw = lbw
        self.fidelity_prompts = list(range(prompt_count))
        self.extra_prompts: list[SamplePrompt] = [parse_prompt_line(p, "--flexibility_prompt") for p, _ in pairs]
        self.flexibility_texts = [text for _, text in pairs]
        self.flexibility_indices = [prompt_count + j for j in range(len(pairs))]

    def _cells(self, epoch: int | None, prompt_indices: list[int]) -> list:
        from lorafit.inference.grid_cells import Cell

        strength, lbw = (0.0, None) if epoch is None else (self.strength, self.lbw)
        return [Cell(epoch, strength, p, s, self.cfg, lbw) for p in prompt_indices for s in self.seeds]

    def epochs(self) -> list[int | None]:
        return [None, *range(len(self.files))]

    def cells_by_epoch(self) -> dict[int | None, list]:
        """Every cell the metrics need, grouped by epoch (None = base model)."""
        return {e: self._cells(e, self.fidelity_prompts + self.flexibility_indices) for e in self.epochs()}

    def score(self, cells, clip_model: str, device, out_dir: Path) -> dict:
        """CLIP-score the rendered cells; returns the table, the suggestion and a flexibility sheet."""
        from lorafit.inference.clip_scores import ClipScorer

        scorer = ClipScorer(clip_model, device)
        texts = dict(zip(self.flexibility_indices, self.flexibility_texts))
        scores = []
        for epoch in self.epochs():
            fidelity_images = [cells.images[c] for c in self._cells(epoch, self.fidelity_prompts)]
            flex_cells = self._cells(epoch, self.flexibility_indices)
            scores.append(
                EpochScore(
                    label="base model" if epoch is None else self.files[epoch].label,
                    fidelity=fidelity_score(scorer, fidelity_images, self.reference.images),
                    flexibility=flexibility_score(
                        scorer, [cells.images[c] for c in flex_cells], [texts[c.prompt] for c in flex_cells]
                    ),
                    is_base=epoch is None,
                )
            )
        best, reason = suggest_epoch(scores)
        rows = [[s.label, s.fidelity, s.flexibility, "" if s.balance is None else s.balance] for s in scores]
        sheet_rows = [
            [cells.images[c] for c in self._cells(e, self.flexibility_indices) if c.seed == self.seeds[0]]
            for e in self.epochs()
        ]
        sheet, _ = make_sheet(
            sheet_rows,
            [p.prompt for p in self.extra_prompts],
            [s.label for s in scores],
            title=f"flexibility prompts, seed {self.seeds[0]}, strength {self.strength:g}",
        )
        sheet_path = out_dir / "flexibility.png"
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(sheet_path)
        return {
            "headers": ["LoRA", "fidelity (CLIP image sim.)", "flexibility (CLIP text sim.)", "balance"],
            "rows": rows,
            "highlight": scores.index(best) if best else None,
            "scores": [vars(s) for s in scores],
            "suggested": best.label if best else None,
            "reason": reason,
            "sheet": sheet_path,
            "clip_model": clip_model,
        }
