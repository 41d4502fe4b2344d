#!/usr/bin/env python
"""Every GPU measurement lorafit wants, in one unattended run of under 8 minutes (tools/gpu_check.sh).

Runs tools/bench.py's training-step benchmark on the full-size architectures and prints the rows
for benchmarks/RESULTS.md, with date, GPU, versions and commands:

1. SDXL 1024², rank 32 on attention, batch 1 and 4: images/s, MFU, lightning / reference ratio;
2. SD1.5 512², batch 8: the same;
3. the low-VRAM recipe (configs/presets/sdxl-lowvram.yaml; Adafactor and AdamW8bit, and the same
   without checkpointing): the measured peak (``torch.cuda.max_memory_allocated``) beside the
   estimate in benchmarks/memory-estimates.jsonl for the same setting;
4. FLUX.1 [dev] at full size (:func:`flux_bench_args`): step time, MFU and peak memory at 512² and
   1024², bf16 vs NF4 base, beside the estimates; then 1024² bf16 without checkpointing, the
   issue's speed goal (>= 2 images/s on an H100).

Groups run in that order, each in its own process under what is left of ``--budget-s``: one that
does not fit is stopped and named in the report, so the run always ends in time and prints what it
measured. ``--dry-run`` runs the same groups on the CPU at tiny sizes (1/8 width, 64 px, one step):
CI proves the script works end to end without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# Warm-up and timed steps per loop: enough for a stable H100 step time (about 0.2 s for SDXL b1).
TIMING = ["--warmup", "3", "--steps", "10", "--count-syncs", "false"]
# FLUX.1 [dev] as configs/flux.yaml trains it (batch 1, rank 16 on attention + MLP, AdamW8bit).
FLUX_RECIPE = [
    "--family",
    "flux",
    "--batch-size",
    "1",
    "--rank",
    "16",
    "--targets",
    "attn-mlp",
    "--optimizer",
    "adamw8bit",
]
# The same code path on a CPU at a size that takes seconds.
DRY_RUN = ["--width-divisor", "8", "--resolution", "64", "--precision", "fp32", "--optimizer", "adamw", "--rank", "4"]
DRY_TIMING = ["--device", "cpu", "--warmup", "1", "--steps", "1", "--count-syncs", "false", "--threads", "1"]


@dataclasses.dataclass
class Group:
    """One tools/bench.py invocation and the RESULTS.md section its rows go to."""

    title: str
    args: list[str]
    dry_args: list[str]


def flux_bench_args() -> list[str]:
    """tools/bench.py arguments of the Flux rows: FLUX.1 [dev] at full size (random weights), batch 1,
    configs/flux.yaml's network (rank 16 on attention + MLP), AdamW8bit and gradient checkpointing,
    at 512² and 1024², the frozen transformer in bf16 and, when bitsandbytes is installed, in NF4
    (configs/presets/flux-lowvram.yaml). Their labels are those of the estimates in
    benchmarks/memory-estimates-flux.jsonl, so the report prints each measured peak beside its estimate.
    """
    return [
        *FLUX_RECIPE,
        "--resolution",
        "512,1024",
        "--gradient-checkpointing",
        "true",
        "--quantization",
        _quantizations(),
    ]


def _quantizations() -> str:
    """bf16 and NF4 bases where bitsandbytes is installed (``lorafit[bnb]``), else bf16 only."""
    return "none,nf4" if importlib.util.find_spec("bitsandbytes") else "none"


def groups() -> list[Group]:
    """The measurements in the order they run (the most wanted first, in case the budget runs out)."""
    return [
        Group(
            "SDXL 1024², rank 32 on attention",
            ["--family", "sdxl", "--resolution", "1024", "--batch-size", "1,4"],
            ["--family", "sdxl"],
        ),
        Group(
            "SD1.5 512², batch 8",
            ["--family", "sd1", "--resolution", "512", "--batch-size", "8"],
            ["--family", "sd1"],
        ),
        Group(
            "Low-VRAM recipe (SDXL 1024², batch 1)",
            ["--preset", "low-vram"],
            ["--family", "sdxl", "--gradient-checkpointing", "true", "--optimizer", "adafactor"],
        ),
        Group(
            "Flux.1 [dev] 512² and 1024², bf16 vs NF4 base",
            flux_bench_args(),
            # The dry run's 64 px image is 16 tokens; a 64-token caption keeps T5's share as small.
            [
                "--family",
                "flux",
                "--text-tokens",
                "64",
                "--gradient-checkpointing",
                "true",
                "--quantization",
                _quantizations(),
            ],
        ),
        Group(
            "Flux.1 [dev] 1024² without checkpointing (the speed goal: >= 2 images/s)",
            [*FLUX_RECIPE, "--resolution", "1024"],
            ["--family", "flux", "--text-tokens", "64"],
        ),
    ]


def _bench_command(group: Group, dry_run: bool, output: Path) -> list[str]:
    if dry_run:
        # Later flags win in tools/bench.py's parser, so the group's own choices come after the tiny sizes.
        args = [*DRY_RUN, *group.dry_args, *DRY_TIMING]
    else:
        args = [*group.args, *TIMING]
    return [sys.executable, str(REPO / "tools" / "bench.py"), *args, "--output", str(output)]


def _estimates() -> dict[str, float]:
    """Estimated peak GiB per setting label (benchmarks/memory-estimates*.jsonl: the SD/SDXL rows and
    the Flux ones), to print beside measured peaks."""
    rows = [
        json.loads(line)
        for path in sorted((REPO / "benchmarks").glob("memory-estimates*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return {row["setting"]: row["peak_bytes"] / 2**30 for row in rows if "setting" in row}


def run(dry_run: bool, budget_s: float, output: Path, only: list[str] | None = None) -> int:
    """Run the groups (those whose title contains a word of ``only``, if given) under ``budget_s``."""
    from lorafit.bench.devices import environment
    from lorafit.bench.report import markdown_table

    started = time.monotonic()
    env = environment()
    dry = " · DRY RUN (CPU, tiny sizes)" if dry_run else ""
    print(f"# lorafit GPU check · {env['date']} · commit {env['commit']}{dry}")
    sections, failed = [], 0
    for group in groups():
        if only and not any(word.lower() in group.title.lower() for word in only):
            continue
        left = budget_s - (time.monotonic() - started)
        if left < 30:
            sections.append(f"## {group.title}\n\nnot measured: the {budget_s:.0f} s budget was spent\n")
            continue
        with tempfile.TemporaryDirectory() as scratch:
            rows_file = Path(scratch) / "rows.jsonl"
            command = _bench_command(group, dry_run, rows_file)
            print(f"\n[{time.monotonic() - started:5.0f} s] {group.title}: {' '.join(command[1:])}", flush=True)
            try:
                result = subprocess.run(command, cwd=REPO, timeout=left, capture_output=True, text=True)
                status = "" if result.returncode == 0 else f"tools/bench.py failed (exit {result.returncode})"
                if status:  # the first error and the last lines: a teardown error can follow the real one
                    text = result.stderr
                    print(text if len(text) < 12000 else f"{text[:6000]}\n[...]\n{text[-6000:]}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                status = f"stopped after {left:.0f} s: the budget ran out"
            rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
        failed += bool(status) and not rows
        with output.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({**row, "gpu_check": group.title}) + "\n")
        sections.append(_section(group, rows, status, env, markdown_table))
    print(f"\nRows for benchmarks/RESULTS.md ({time.monotonic() - started:.0f} s in all; raw rows: {output}):\n")
    print("\n".join(sections))
    return 1 if failed else 0


def _section(group: Group, rows: list[dict], status: str, env: dict, markdown_table) -> str:
    device = rows[0]["device"] if rows else "?"
    head = (
        f"## {group.title}\n\n{env['date']} · {device} · torch {env['torch']} · lightning {env['lightning']} · "
        f"diffusers {env['diffusers']} · peft {env['peft']} · commit {env['commit']} · "
        f"command: `{rows[0]['command'].split(' --output')[0] if rows else 'python tools/bench.py'}`\n"
    )
    lines = [head, markdown_table(rows)] if rows else [head]
    estimates = _estimates()
    compared = [row for row in rows if row["setting"] in estimates and row.get("peak_gib") is not None]
    for row in compared:
        lines.append(
            f"- {row['setting']}: measured peak {row['peak_gib']:.2f} GiB, estimate {estimates[row['setting']]:.2f} GiB"
        )
    if status:
        lines.append(f"\n{status}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one step: prove the script runs")
    parser.add_argument(
        "--budget-s", type=float, default=450, help="wall-clock seconds for all measurements (default 450)"
    )
    parser.add_argument("--output", default=None, help="JSONL of every row (default: benchmarks/results-gpu.jsonl)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="WORD",
        help="run only the groups whose title contains one of these words, e.g. `--only flux` (about 4 min)",
    )
    args = parser.parse_args(argv)
    if args.only and not any(w.lower() in g.title.lower() for g in groups() for w in args.only):
        parser.error(f"--only {' '.join(args.only)}: no group matches; groups: {'; '.join(g.title for g in groups())}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the script on a CPU")
    default = REPO / "benchmarks" / "results-gpu.jsonl"
    if args.dry_run:
        default = Path(tempfile.gettempdir()) / "lorafit-gpu-check-dry-run.jsonl"
    return run(args.dry_run, args.budget_s, Path(args.output) if args.output else default, args.only)


if __name__ == "__main__":
    from lorafit.cli.startup import quiet_known_notices

    quiet_known_notices()  # bitsandbytes' offline kernel-fetch notices on CPUs, filtered by text as the CLI does
    raise SystemExit(main())
