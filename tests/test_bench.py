"""tools/bench.py: a complete results row on CPU, and FLOP counts of the real architectures.

Speed is never asserted here (benchmarks/RESULTS.md holds the figures); what is asserted is that
the benchmark runs lorafit's step and the reference loop and reports every column, and that its
FLOP counts of the full-size SD1.5/SDXL UNets match the issue's compute budget.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lorafit.errors import LorafitError

ROOT = Path(__file__).resolve().parents[1]


def _bench_tool():
    spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_cpu_run_writes_a_complete_row(tmp_path):
    from lorafit.bench.report import COLUMNS

    output = tmp_path / "rows.jsonl"
    rows = _bench_tool().main(
        ["--preset", "ci", "--device", "cpu", "--warmup", "1", "--steps", "1", "--output", str(output)]
    )
    assert len(rows) == 1
    row = json.loads(output.read_text().splitlines()[0])
    for column in COLUMNS:
        assert row[column] is not None, column
    for column in (
        "images_per_s",
        "step_ms",
        "peak_gib",
        "tflop_per_image",
        "mfu",
        "reference_images_per_s",
        "lightning_over_reference",
        "peak_tflops",
    ):
        assert row[column] > 0, column
    assert row["family"] == "sdxl" and row["width_divisor"] == 8 and row["trainable_params"] > 0
    for key in ("date", "torch", "lightning", "diffusers", "peft", "device", "command", "peak_source"):
        assert row[key], key
    assert "--preset ci" in row["command"]
    # lorafit's step makes the host wait for nothing; the reference uploads SDXL's time ids each step.
    assert row["host_syncs_per_step"] == 0, row["host_sync_sites"]
    assert row["reference_host_syncs_per_step"] == 1 and "tensor at" in next(iter(row["reference_host_sync_sites"]))


def test_full_size_unets_have_the_published_parameter_counts():
    from lorafit.bench.architectures import build_unet, count_params

    assert count_params(build_unet("sd1", device="meta")) == 859_520_964
    assert count_params(build_unet("sdxl", device="meta")) == 2_567_463_684


@pytest.mark.parametrize("family, resolution, tflop", [("sd1", 512, 0.80), ("sdxl", 1024, 6.76)])
def test_full_size_forward_flops_match_the_compute_budget(family, resolution, tflop):
    from lorafit.bench.flops import forward_flops

    assert forward_flops(family, resolution) / 1e12 == pytest.approx(tflop, rel=0.02)


def test_sd15_lora_step_flops_are_about_twice_the_forward():
    from lorafit.bench.flops import step_flops
    from lorafit.bench.module import BenchLoraModule

    module = BenchLoraModule("sd1", build_device="meta", rank=32, target_preset="attn")
    flops = step_flops(module, 512, 1)
    assert flops / 1e12 == pytest.approx(1.73, rel=0.02)  # the SD1.5 step budget per image


def test_bad_setting_is_one_line_error():
    from lorafit.bench.settings import BenchSetting

    with pytest.raises(LorafitError, match="--optimizer: 'sgd' is not one of"):
        BenchSetting(optimizer="sgd")


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu_and_prints_every_section(tmp_path):
    """tools/gpu_check.sh --dry-run: the GPU machine's script, on the CPU at tiny sizes."""
    import os
    import subprocess

    output = tmp_path / "rows.jsonl"
    env = {**os.environ, "LORAFIT_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--output", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout.split("Rows for benchmarks/RESULTS.md", 1)[1]
    for title in ("## SDXL 1024²", "## SD1.5 512²", "## Low-VRAM recipe", "## Flux"):
        assert title in report, title
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["family"] for row in rows] == ["sdxl", "sd1", "sdxl"]
    assert rows[2]["gradient_checkpointing"] and rows[2]["optimizer"] == "adafactor"
    for row in rows:
        assert row["images_per_s"] > 0 and row["lightning_over_reference"] > 0 and row["peak_gib"] > 0
        assert f"| {row['setting']} |" in report
    assert "--output" not in report  # the printed commands are the ones to rerun


def test_the_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--dry-run" in result.stderr
