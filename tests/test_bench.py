"""tools/bench.py: a complete results row on CPU, and FLOP counts of the real architectures.

Speed is never asserted here (benchmarks/RESULTS.md holds the figures); what is asserted is that
the benchmark runs lorafit's step and the reference loop and reports every column, and that its
FLOP counts of the full-size SD1.5/SDXL UNets and the FLUX.1 transformer match their arithmetic;
the Flux configs are the published models (parameter counts on the meta device) and the prepared
GPU command (tools/gpu_check.py) has the Flux rows.
"""

from __future__ import annotations

import importlib.util
import json
import sys
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
def test_bench_cpu_run_writes_a_complete_row_for_sdxl_and_flux(tmp_path):
    from lorafit.bench.report import COLUMNS

    output = tmp_path / "rows.jsonl"
    rows = _bench_tool().main(
        ["--preset", "ci", "--device", "cpu", "--warmup", "1", "--steps", "1", "--output", str(output)]
    )
    assert len(rows) == 2
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["family"] for row in written] == ["sdxl", "flux"]
    for row in written:
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
        assert row["width_divisor"] == 8 and row["trainable_params"] > 0
        for key in ("date", "torch", "lightning", "diffusers", "peft", "device", "command", "peak_source"):
            assert row[key], key
        assert "--preset ci" in row["command"]
        # lorafit's step makes the host wait for nothing, on the UNet and on the transformer.
        assert row["host_syncs_per_step"] == 0, row["host_sync_sites"]
    sdxl, flux = written
    # The reference uploads SDXL's time ids each step; its Flux loop builds the position ids once.
    assert sdxl["reference_host_syncs_per_step"] == 1 and "tensor at" in next(iter(sdxl["reference_host_sync_sites"]))
    assert flux["reference_host_syncs_per_step"] == 0, flux["reference_host_sync_sites"]
    # Flux's step: 64 px = 16 packed image tokens beside the 64 T5 tokens asked for, through 57 blocks.
    assert flux["text_tokens"] == 64 and flux["tflop_per_image"] > sdxl["tflop_per_image"]


def test_full_size_unets_have_the_published_parameter_counts():
    from lorafit.bench.architectures import build_denoiser, count_params

    assert count_params(build_denoiser("sd1", device="meta")) == 859_520_964
    assert count_params(build_denoiser("sdxl", device="meta")) == 2_567_463_684


def test_full_size_flux_has_the_published_parameter_counts():
    """The Hub's safetensors sizes: FLUX.1-dev's transformer 23,802,816,640 bytes of BF16, schnell's
    23,782,357,120 (no guidance embedder), their shared ae.safetensors 83,819,683 values."""
    from lorafit.bench.architectures import build_denoiser, build_vae, count_params

    dev = build_denoiser("flux", device="meta")
    assert count_params(dev) == 23_802_816_640 // 2 == 11_901_408_320
    assert count_params(build_denoiser("flux-schnell", device="meta")) == 23_782_357_120 // 2
    assert count_params(build_vae("flux", device="meta")) == 83_819_683
    config = dev.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads, config.attention_head_dim) == (
        19,
        38,
        24,
        128,
    )
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.in_channels) == (4096, 768, 64)
    assert config.guidance_embeds and not build_denoiser("flux-schnell", device="meta").config.guidance_embeds


def test_an_edited_flux_config_is_not_passed_off_as_the_published_model(monkeypatch):
    from lorafit.bench import architectures

    real = architectures.published_config

    def fewer_blocks(name, part):
        config = real(name, part)
        return {**config, "num_single_layers": 37} if part == "transformer" else config

    monkeypatch.setattr(architectures, "published_config", fewer_blocks)
    with pytest.raises(
        LorafitError,
        match="flux transformer built from .* the published one 11,901,408,320; its config file was changed",
    ):
        architectures.build_denoiser("flux", device="meta")


def test_width_divided_flux_keeps_its_blocks_and_head_width():
    from lorafit.bench.architectures import build_denoiser

    small = build_denoiser("flux", width_divisor=8, device="meta").config
    assert (small.num_layers, small.num_single_layers, small.attention_head_dim) == (19, 38, 128)
    assert (small.num_attention_heads, small.joint_attention_dim, small.pooled_projection_dim) == (3, 512, 96)


@pytest.mark.parametrize("family, resolution, tflop", [("sd1", 512, 0.80), ("sdxl", 1024, 6.76)])
def test_full_size_forward_flops_match_the_compute_budget(family, resolution, tflop):
    from lorafit.bench.flops import forward_flops

    assert forward_flops(family, resolution) / 1e12 == pytest.approx(tflop, rel=0.02)


def test_sd15_lora_step_flops_are_about_twice_the_forward():
    from lorafit.bench.flops import step_flops
    from lorafit.bench.module import BenchLoraModule

    module = BenchLoraModule("sd1", build_device="meta", network={"rank": 32, "preset": "attn"})
    flops = step_flops(module, 512, 1)
    assert flops / 1e12 == pytest.approx(1.73, rel=0.02)  # the SD1.5 step budget per image


def _flux_forward_formula(resolution: int, text_tokens: int = 512) -> int:
    """FLUX.1's forward FLOPs from its shapes: 2 per multiply-add of every Linear on every token and
    of attention's two [L, L] products, and of the Linears that act once per image."""
    d, mlp, t5 = 24 * 128, 4 * 24 * 128, 4096
    image, text = (resolution // 16) ** 2, text_tokens
    length = image + text
    double_stream = 4 * d * d + 2 * d * mlp  # q, k, v, out; MLP in and out: once per stream and token
    single = 3 * d * d + d * mlp + (d + mlp) * d  # q, k, v; proj_mlp; proj_out of [attention, MLP]
    per_token = 19 * double_stream * length + 38 * single * length + t5 * d * text + 2 * 64 * d * image
    # Modulation: 6 vectors per stream of a double block, 3 of a single block, 2 at the end; the
    # timestep and guidance embedders (256 -> d -> d) and the pooled CLIP projection (768 -> d -> d).
    per_image = (19 * 2 * 6 + 38 * 3 + 2) * d * d + 2 * (256 * d + d * d) + 768 * d + d * d
    attention = 57 * 2 * length * length * d
    return 2 * (per_token + per_image + attention)


@pytest.mark.parametrize("resolution", [512, 1024])
def test_full_size_flux_forward_flops_are_its_transformer_arithmetic(resolution):
    from lorafit.bench.flops import forward_flops

    assert forward_flops("flux", resolution) == _flux_forward_formula(resolution)


@pytest.mark.slow
def test_flux_lora_step_flops_are_a_forward_and_a_backward_to_the_inputs():
    """The backward of a frozen Linear computes only its input's gradient (1x its forward), of attention
    both products' inputs (2x); LoRA adds about 1%. So the 1024² step is 2.2x the forward."""
    from lorafit.bench.flops import forward_flops, step_flops
    from lorafit.bench.module import BenchLoraModule

    module = BenchLoraModule("flux", build_device="meta", network={"rank": 16, "preset": "attn-mlp"})
    step, forward = step_flops(module, 1024, 1), forward_flops("flux", 1024)
    attention = 2 * 57 * 2 * 4608 * 4608 * 3072
    without_lora = 2 * forward + attention
    assert without_lora < step < 1.01 * without_lora


def test_bad_setting_is_one_line_error():
    from lorafit.bench.architectures import synthetic_batch
    from lorafit.bench.settings import BenchSetting

    with pytest.raises(LorafitError, match="--optimizer: 'sgd' is not one of"):
        BenchSetting(optimizer="sgd")
    with pytest.raises(LorafitError, match="--family: 'sd3' is not one of sd1, sdxl, flux, flux-schnell"):
        BenchSetting(family="sd3")
    with pytest.raises(LorafitError, match="--quantization: 'int4' is not one of none, nf4"):
        BenchSetting(family="flux", quantization="int4")
    with pytest.raises(LorafitError, match="--text-tokens: sdxl reads CLIP's 77 tokens"):
        BenchSetting(text_tokens=64)
    with pytest.raises(LorafitError, match="resolution 1000 is not a multiple of 16 for flux"):
        synthetic_batch("flux", 1000, 1)


def test_flux_batches_carry_t5_and_clip_conditioning_of_the_published_shapes():
    from lorafit.bench.architectures import synthetic_batch

    dev, schnell = synthetic_batch("flux", 1024, 2), synthetic_batch("flux-schnell", 512, 1, text_tokens=128)
    assert dev["prompt_embeds"].shape == (2, 512, 4096) and dev["pooled_prompt_embeds"].shape == (2, 768)
    assert dev["latent_moments"].shape == (2, 32, 128, 128)  # 16 latent channels' mean and log-variance
    assert schnell["prompt_embeds"].shape == (1, 128, 4096)
    assert synthetic_batch("flux-schnell", 512, 1)["prompt_embeds"].shape == (1, 256, 4096)


def _gpu_check_dry_run(tmp_path, *only: str) -> tuple[str, list[dict]]:
    """tools/gpu_check.sh --dry-run (the GPU machine's script on the CPU at tiny sizes): report and rows."""
    import os
    import subprocess

    output = tmp_path / "rows.jsonl"
    env = {**os.environ, "LORAFIT_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--output", str(output)]
    # The default budget is sized for the GPU; a shared CPU needs longer for the same groups.
    command += ["--budget-s", "850", *(["--only", *only] if only else [])]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout.split("Rows for benchmarks/RESULTS.md", 1)[1]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    for row in rows:
        assert row["images_per_s"] > 0 and row["lightning_over_reference"] > 0 and row["peak_gib"] > 0
        assert f"| {row['setting']} |" in report
    assert "--output" not in report  # the printed commands are the ones to rerun
    return report, rows


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu_and_prints_every_section(tmp_path):
    report, rows = _gpu_check_dry_run(tmp_path, "sdxl", "sd1.5", "low-vram")
    for title in ("## SDXL 1024²", "## SD1.5 512²", "## Low-VRAM recipe"):
        assert title in report, title
    assert "## Flux" not in report  # --only keeps to the groups asked for
    assert [row["family"] for row in rows] == ["sdxl", "sd1", "sdxl"]
    assert rows[2]["gradient_checkpointing"] and rows[2]["optimizer"] == "adafactor"


@pytest.mark.slow
def test_the_gpu_check_flux_groups_run_on_the_cpu(tmp_path):
    """`tools/gpu_check.sh --only flux`: bf16 and (with bitsandbytes) NF4 with checkpointing, then bf16 without."""
    report, rows = _gpu_check_dry_run(tmp_path, "flux")
    assert "## Flux.1 [dev] 512² and 1024², bf16 vs NF4 base" in report
    assert "## Flux.1 [dev] 1024² without checkpointing" in report
    assert "## SDXL" not in report
    nf4 = importlib.util.find_spec("bitsandbytes") is not None
    assert [row["family"] for row in rows] == ["flux"] * (3 if nf4 else 2)
    assert [row["quantization"] for row in rows] == ["none", *(["nf4"] if nf4 else []), "none"]
    assert [row["gradient_checkpointing"] for row in rows] == [True, *([True] if nf4 else []), False]


def _gpu_check_tool():
    spec = importlib.util.spec_from_file_location("gpu_check_tool", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_flux_gpu_rows_are_full_size_dev_at_512_and_1024_bf16_and_nf4():
    """The prepared GPU command: tools/bench.py reads flux_bench_args() as the full-size [dev] rows
    configs/flux.yaml trains (rank 16, attention + MLP, AdamW8bit, checkpointing), NF4 with bitsandbytes."""
    gpu_check = _gpu_check_tool()
    bench = _bench_tool()
    settings = bench.settings_from(bench.parse_args(gpu_check.flux_bench_args()))
    nf4 = importlib.util.find_spec("bitsandbytes") is not None
    expected = sorted((r, q) for r in (512, 1024) for q in (("none", "nf4") if nf4 else ("none",)))
    assert sorted((s.resolution, s.quantization) for s in settings) == expected
    for setting in settings:
        assert (setting.family, setting.width_divisor, setting.batch_size, setting.text_tokens) == ("flux", 1, 1, 0)
        assert (setting.rank, setting.targets, setting.optimizer) == (16, "attn-mlp", "adamw8bit")
        assert setting.gradient_checkpointing and setting.precision == "bf16-weights"
    titles = [
        group.title for group in gpu_check.groups() if group.args[: len(gpu_check.FLUX_RECIPE)] == gpu_check.FLUX_RECIPE
    ]
    assert len(titles) == 2 and all("Flux" in title for title in titles)


def test_the_gpu_check_refuses_to_run_without_a_gpu_unless_dry():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--dry-run" in result.stderr
