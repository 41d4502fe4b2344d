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
