"""The per-module report of a rank cut (resize, SVD merge, extract): what each module kept.

On the terminal: one line per block (modules, ranks, the Frobenius share kept, the worst module),
the modules that kept least, and the mean, as kohya's ``resize_lora.py --verbose`` summarises;
``verbose`` prints every module. ``--report FILE`` writes every module as CSV or JSON (by suffix)
for scripts and notebooks.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.networks.toolbox.blocks import block_of, block_order
from lorafit.networks.toolbox.low_rank import Kept

_WORST = 8


@dataclass(frozen=True)
class ModuleRow:
    """One module's line: its name in the file, its block, the kind it had, and what the cut kept."""

    name: str
    block: str
    kind: str
    kept: Kept

    def as_dict(self) -> dict:
        return {
            "module": self.name,
            "block": self.block,
            "kind": self.kind,
            "rank_before": self.kept.rank_before,
            "rank_after": self.kept.rank_after,
            "fro_kept": round(self.kept.fro, 6),
            "sum_kept": round(self.kept.sum, 6),
            "max_ratio": round(self.kept.max_ratio, 4),
            "relative_error": round(self.kept.error, 6),
        }


def row(name: str, family: str | None, kind: str, kept: Kept) -> ModuleRow:
    return ModuleRow(name, block_of(name, family), kind, kept)


def _ranks(rows: list[ModuleRow], attribute: str) -> str:
    values = sorted({getattr(r.kept, attribute) for r in rows})
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def summary_lines(rows: list[ModuleRow], verbose: bool = False) -> list[str]:
    """The terminal report (see the module docstring)."""
    if not rows:
        return ["no module was cut"]
    lines = []
    if verbose:
        width = max(len(r.name) for r in rows)
        for r in rows:
            lines.append(
                f"  {r.name:<{width}}  rank {r.kept.rank_before:>4} -> {r.kept.rank_after:<4} "
                f"Frobenius kept {r.kept.fro:7.2%}  sum(S) kept {r.kept.sum:7.2%}  max(S) ratio {r.kept.max_ratio:6.1f}"
            )
        lines.append("")
    blocks: dict[str, list[ModuleRow]] = {}
    for r in rows:
        blocks.setdefault(r.block, []).append(r)
    lines.append(
        f"  {'block':<6} {'modules':>7}  {'rank before':>11}  {'rank after':>10}  {'Frobenius kept':>14}  worst"
    )
    for block in sorted(blocks, key=block_order):
        group = blocks[block]
        mean = statistics.fmean(r.kept.fro for r in group)
        worst = min(group, key=lambda r: r.kept.fro)
        lines.append(
            f"  {block:<6} {len(group):>7}  {_ranks(group, 'rank_before'):>11}  {_ranks(group, 'rank_after'):>10}  "
            f"{mean:>14.2%}  {worst.kept.fro:.2%} {worst.name}"
        )
    worst = sorted(rows, key=lambda r: r.kept.fro)[:_WORST]
    if not verbose and len(rows) > _WORST:
        lines.append(f"  the {len(worst)} modules that kept least:")
        lines += [f"    {r.kept.fro:7.2%}  rank {r.kept.rank_before} -> {r.kept.rank_after}  {r.name}" for r in worst]
    fros = [r.kept.fro for r in rows]
    spread = statistics.pstdev(fros) if len(fros) > 1 else 0.0
    lines.append(
        f"  Frobenius norm kept: mean {statistics.fmean(fros):.2%} (std {spread:.3f}), worst {min(fros):.2%}; "
        f"relative error: mean {statistics.fmean(r.kept.error for r in rows):.2%}, "
        f"worst {max(r.kept.error for r in rows):.2%}"
    )
    return lines


def write_report(rows: list[ModuleRow], path: str | Path) -> Path:
    """Every module's line as ``.csv`` or ``.json`` (chosen by the suffix)."""
    path = Path(path)
    records = [r.as_dict() for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(records, indent=1) + "\n")
    elif path.suffix.lower() == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["module"])
            writer.writeheader()
            writer.writerows(records)
    else:
        raise LorafitError(f"--report {path}: write .csv or .json")
    return path
