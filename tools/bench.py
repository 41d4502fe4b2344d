#!/usr/bin/env python
"""Benchmark lorafit's LoRA training step on the real SD1.5/SDXL/FLUX.1 architectures (random weights).

Every row times lorafit's Lightning step and a plain PyTorch loop on the same model, side by side,
and reports images/s, step time, peak memory, MFU from a FlopCounter count of the same step, and
the Lightning/reference time ratio. See docs/performance.md.

    # what CPU CI can run (real block layout at 1/8 width):
    python tools/bench.py --preset cpu --output benchmarks/results-cpu.jsonl
    # the H100 grid (~25 min):
    python tools/bench.py --preset h100 --steps 20 --warmup 5 --output benchmarks/results-h100.jsonl
    # one setting, any knob from the command line (comma lists make a grid):
    python tools/bench.py --family sdxl --resolution 1024 --batch-size 1,4 --gradient-checkpointing false,true
    # FLUX.1 [dev], bf16 vs NF4 base (bitsandbytes), rank 16 on attention + MLP:
    python tools/bench.py --family flux --resolution 512,1024 --rank 16 --targets attn-mlp --quantization none,nf4
    # no GPU: ESTIMATE the peak GPU memory of the same settings on fake tensors (docs/memory-estimate.md):
    python tools/bench.py --preset low-vram --estimate-memory
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/devbench: the memory estimate (not in the wheel)

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def parse_args(argv=None) -> argparse.Namespace:
    from lorafit.bench.settings import PRESETS, BenchSetting

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a predefined list of settings (overrides the grid)")
    for field in dataclasses.fields(BenchSetting):
        kind = _bool if field.type in ("bool", bool) else int if field.type in ("int", int) else str
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            default=None,
            metavar="V[,V...]",
            help=f"default {field.default}; comma-separated values make a grid",
            type=lambda text, kind=kind: [kind(v) for v in text.split(",")],
        )
    parser.add_argument("--device", default=None, help="cuda or cpu; default: cuda if available")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, autotune)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per loop")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time both loops this many times, interleaved; the best time of each counts",
    )
    parser.add_argument("--loops", default="lightning,reference", help="which loops to time: lightning,reference")
    parser.add_argument(
        "--count-syncs",
        type=_bool,
        default=True,
        help="also count host syncs per step of both loops (short extra runs; default true)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="only print the FLOP budget of the full-size denoisers (meta device, no timing) and exit",
    )
    parser.add_argument(
        "--estimate-memory",
        action="store_true",
        help="instead of timing, ESTIMATE each setting's peak GPU memory on fake tensors (no device "
        "needed; tools/devbench/memory.py, docs/memory-estimate.md) and print a table",
    )
    parser.add_argument(
        "--check-real",
        action="store_true",
        help="with --estimate-memory: also run each setting on real CPU tensors under the same "
        "tracker and print both counts (small settings only: width divisor 8, low resolution)",
    )
    parser.add_argument("--output", default=None, help="append one JSON line per row to this file")
    return parser.parse_args(argv)


def settings_from(args) -> list:
    from lorafit.bench.settings import PRESETS, BenchSetting, grid

    if args.preset:
        return PRESETS[args.preset]
    choices = {field.name: getattr(args, field.name) for field in dataclasses.fields(BenchSetting)}
    return grid(BenchSetting(), **{name: values for name, values in choices.items() if values})


def print_flop_budget() -> None:
    """Forward, LoRA step and checkpointed step FLOPs of the full-size denoisers, counted on meta:
    SD1.5 at 512² and SDXL at 1024² (rank 32 on attention), Flux.1 [dev] at 512² and 1024² (rank 16
    on attention + MLP, configs/flux.yaml's network)."""
    from lorafit.bench.flops import forward_flops, step_flops
    from lorafit.bench.module import BenchLoraModule

    rows = (
        ("sd1", 512, {"rank": 32, "preset": "attn"}),
        ("sdxl", 1024, {"rank": 32, "preset": "attn"}),
        ("flux", 512, {"rank": 16, "preset": "attn-mlp"}),
        ("flux", 1024, {"rank": 16, "preset": "attn-mlp"}),
    )
    print("| model | forward TFLOP | LoRA step TFLOP | step with gradient checkpointing | LoRA |")
    print("|---|---|---|---|---|")
    for family, resolution, network in rows:
        forward = forward_flops(family, resolution)
        step, checkpointed = (
            step_flops(
                BenchLoraModule(family, build_device="meta", network=network), resolution, 1, gradient_checkpointing=gc
            )
            for gc in (False, True)
        )
        print(
            f"| {family} {resolution}² | {forward / 1e12:.3f} | {step / 1e12:.3f} ({step / forward:.2f}x) | "
            f"{checkpointed / 1e12:.3f} ({checkpointed / forward:.2f}x) | "
            f"rank {network['rank']}, {network['preset']} |",
            flush=True,
        )


def print_memory_estimates(settings: list, output=None, command: str = "", check_real: bool = False) -> list[dict]:
    """Estimated peak GiB and its breakdown for each setting (2 steps each, fake tensors); with
    ``check_real`` also the same count on real CPU tensors, as a ``real CPU`` note."""
    from devbench.memory import estimate_step_memory, measure_step_memory, memory_table

    from lorafit.bench.devices import environment
    from lorafit.bench.report import write_jsonl

    env = environment()
    rows = []
    for setting in settings:
        result = estimate_step_memory(setting)
        if check_real:
            real = measure_step_memory(setting)
            result["real_cpu_peak_bytes"] = real["peak_bytes"]
            result["notes"].append(
                f"real CPU tensors: {real['peak_bytes']:,} B, estimate {result['peak_bytes']:,} B "
                f"({result['peak_bytes'] / real['peak_bytes'] - 1:+.5%})"
            )
        row = {**result, **dataclasses.asdict(setting), **env, "command": command, "kind": "memory-estimate"}
        rows.append(row)
        print(memory_table([row]).splitlines()[-1], f"({result['seconds']:.0f} s)", flush=True)
        if output:
            write_jsonl([row], output)
    print(
        f"\nESTIMATE (fake tensors, no GPU) · {env['date']} · torch {env['torch']} · lightning {env['lightning']} · "
        f"diffusers {env['diffusers']} · peft {env['peft']} · commit {env['commit']}\n"
    )
    print(memory_table(rows))
    return rows


def main(argv=None) -> list[dict]:
    import torch

    from lorafit.bench.devices import describe_device, environment, peak_tflops
    from lorafit.bench.report import markdown_table, result_row, write_jsonl
    from lorafit.bench.runner import run_setting

    args = parse_args(argv)
    if args.count_flops:
        print_flop_budget()
        return []
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.estimate_memory:
        return print_memory_estimates(settings_from(args), args.output, command, args.check_real)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what every trainer sets; bf16 rows are unaffected
    env, name = environment(), describe_device(device)
    loops = tuple(loop.strip() for loop in args.loops.split(",") if loop.strip())
    peaks: dict[bool, tuple[float, str]] = {}
    rows = []
    for setting in settings_from(args):
        bf16 = setting.precision != "fp32"
        if bf16 not in peaks:
            peaks[bf16] = peak_tflops(device, bf16)
        measured = run_setting(setting, device, args.warmup, args.steps, loops, args.repeats, args.count_syncs)
        row = result_row(setting, measured, peaks[bf16][0], name, env)
        row.update(
            peak_source=peaks[bf16][1], warmup=args.warmup, steps=args.steps, repeats=args.repeats, command=command
        )
        rows.append(row)
        print(markdown_table([row]).splitlines()[-1], flush=True)
        if args.output:
            write_jsonl([row], args.output)
    print(
        f"\n{env['date']} · {name} · torch {env['torch']} · lightning {env['lightning']} · diffusers "
        f"{env['diffusers']} · peft {env['peft']} · commit {env['commit']}"
    )
    print(
        "MFU peaks: " + "; ".join(f"{'bf16' if k else 'fp32'} {v:.3g} TFLOP/s ({src})" for k, (v, src) in peaks.items())
    )
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    from lorafit.cli.startup import quiet_known_notices

    quiet_known_notices()  # bitsandbytes' offline kernel-fetch notices on CPUs, filtered by text as the CLI does
    main()
