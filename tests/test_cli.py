"""The `lorafit` command: every config parses, bad input gets one line, the demo path works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_flags import cpu_fit_flags

from lorafit.cli import main
from lorafit.errors import LorafitError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# configs/<topic>/*.yaml are overlays: composed after a full config with a second --config.
OVERLAYS = sorted((REPO / "configs").glob("*/*.yaml"))


def _lorafit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    # One torch thread, as every other test process: two tests' processes with two threads each on a
    # 2-core machine made a 40-step tiny fit take 85 s instead of 10 (OpenMP threads waiting on each other).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("lorafit")
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_prints_a_complete_commented_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert {"model", "data", "trainer", "export", "checkpoint", "seed_everything"} <= printed.keys()
    assert printed["model"]["model"] == yaml.safe_load(config.read_text())["model"]["model"]
    assert "# LoRA rank" in text, "option help should appear as comments"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_overlay_composes_with_a_full_config(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, values in yaml.safe_load(overlay.read_text()).items():
        if not isinstance(values, dict):  # a top-level value such as seed_everything
            assert printed[section] == values, section
            continue
        for key, value in values.items():
            if not isinstance(value, (dict, list)):
                assert printed[section][key] == value, (section, key)
            elif isinstance(value, dict) and "class_path" in value:
                assert printed[section][key]["class_path"] == value["class_path"], (section, key)


def _fit_error(tmp_path, capsys, *args: str) -> str:
    config = REPO / "configs" / "tiny-demo.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    return err[0]


def test_bad_input_gets_one_line_before_heavy_work(tmp_path, capsys, demo_data, tiny_models):
    good = ["--model.model", tiny_models["sdxl"], "--data.train_dir", demo_data]
    assert "does not exist" in _fit_error(tmp_path, capsys, *good, "--model.model", str(tmp_path / "nope"))
    assert "not a diffusers pipeline" in _fit_error(tmp_path, capsys, *good, "--model.model", str(tmp_path))
    assert "model.rnak" in _fit_error(tmp_path, capsys, *good, "--model.rnak", "4")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  learning_rat: 0.1\n")
    assert "model.learning_rat" in _fit_error(tmp_path, capsys, *good, "--config", str(bad_yaml))
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _fit_error(tmp_path, capsys, *good, "--data.train_dir", str(empty))
    assert str(empty) in message and "no images" in message.lower()
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.slow
def test_help_for_every_verb():
    for verb in (
        "fit",
        "validate",
        "convert",
        "tiny",
        "demo-data",
        "toy-data",
        "prepare",
        "submit",
        "cache",
        "generate",
        "grid",
        "probe",
    ):
        result = _lorafit(verb, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
    unknown = _lorafit("trian")
    assert unknown.returncode == 2 and "unknown verb 'trian'" in unknown.stderr


@pytest.mark.slow
def test_demo_commands_end_to_end(tmp_path):
    """The plumbing demo: tiny SDXL model, generated data, `lorafit fit` on configs/tiny-demo.yaml.

    tests/test_toyworld.py runs the README demo itself (configs/demo.yaml on the toy base model)
    and measures what it learns.
    """
    assert _lorafit("tiny", "sdxl", str(tmp_path / "tiny-sdxl")).returncode == 0
    assert _lorafit("demo-data", str(tmp_path / "data")).returncode == 0
    run = tmp_path / "run"
    result = _lorafit(
        "fit",
        "--config",
        "configs/tiny-demo.yaml",
        "--model.model",
        str(tmp_path / "tiny-sdxl"),
        "--data.train_dir",
        str(tmp_path / "data"),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.max_epochs",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (run / "lora").glob("*.safetensors"))
    assert names == ["ohwx-star-epoch-001.safetensors", "ohwx-star-epoch-002.safetensors", "ohwx-star.safetensors"]
    assert len(list((run / "lora" / "diffusers").glob("*.safetensors"))) == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["network"]["rank"] == 8 and saved["data"]["train_dir"] == str(tmp_path / "data")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "epoch-001_step-000020_00.png",
        "epoch-002_step-000040_00.png",
    ]
    # The demo dataset has one image without a caption: the folder's prompt is used, and said so.
    assert "have no .txt caption, so their folder name was used" in result.stderr

    validated = _lorafit(
        "validate",
        "--config",
        "configs/tiny-demo.yaml",
        "--model.model",
        str(tmp_path / "tiny-sdxl"),
        "--data.train_dir",
        str(tmp_path / "data"),
        "--data.val_dir",
        str(tmp_path / "data"),
        "--trainer.default_root_dir",
        str(run),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
    )
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert "loss/validation" in validated.stdout


def test_prepare_takes_several_source_folders(tmp_path):
    from PIL import Image

    for folder, colour in (("a/3_ohwx dog", "red"), ("b/1_sks cat", "blue")):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (320, 256), colour).save(tmp_path / folder / "img.png")
        (tmp_path / folder / "img.txt").write_text(folder.split("_", 1)[1])
    result = _lorafit(
        "prepare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "shards"), "--resolution", "256"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = yaml.safe_load((tmp_path / "shards" / "dataset.json").read_text())
    assert summary["samples_written"] == 2


PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))


def test_presets_exist_and_say_what_they_are_in_one_line():
    names = {p.stem for p in PRESETS}
    assert {"sd15-character", "sd15-style", "sd15-concept", "sdxl-character", "sdxl-style", "sdxl-lowvram"} <= names
    for preset in PRESETS:
        first = preset.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 40, f"{preset.name}: first line should describe the preset"


def _needs_cuda(preset: Path) -> bool:
    """bitsandbytes quantizes a base on a CUDA GPU only (diffusers' quantizer checks)."""
    return yaml.safe_load(preset.read_text())["model"].get("quantization") in ("nf4", "int8")


# Overlays (a second --config) on top of the family's full config.
OVERLAY_OF = {"flux-lowvram": "flux.yaml"}


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if not _needs_cuda(p)], ids=lambda p: p.stem)
def test_every_preset_trains_a_step_on_the_tiny_model(preset, tiny_models, demo_data, tmp_path):
    """The recipe in each preset (optimizer + args, schedule, loss options) really runs."""
    family = next(f for f in ("sdxl", "flux", "sd1") if preset.stem.startswith(f) or f == "sd1")
    base_config = ["--config", str(REPO / "configs" / OVERLAY_OF[preset.stem])] if preset.stem in OVERLAY_OF else []
    main(
        [
            "fit",
            *base_config,
            "--config",
            str(preset),
            "--model.model",
            tiny_models[family],
            *cpu_fit_flags(demo_data, str(tmp_path), max_steps=2),
        ]
    )
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    wanted = yaml.safe_load(preset.read_text())["model"]["optimizer"]
    assert {key: saved["model"]["optimizer"][key] for key in wanted} == wanted
    assert list((tmp_path / "lora").glob("*.safetensors"))


@pytest.mark.parametrize("preset", [p for p in PRESETS if _needs_cuda(p)], ids=lambda p: p.stem)
def test_presets_with_a_quantized_base_compose_and_say_they_need_a_gpu_here(preset, tiny_models, capsys):
    base_config = ["--config", str(REPO / "configs" / OVERLAY_OF[preset.stem])] if preset.stem in OVERLAY_OF else []
    with pytest.raises(SystemExit):
        main(["fit", *base_config, "--config", str(preset), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["quantization"] in ("nf4", "int8")
    if not torch.cuda.is_available():
        from lorafit.families.loading import load_base_model

        with pytest.raises(LorafitError, match="needs a CUDA GPU"):
            load_base_model(tiny_models["flux"], quantization=printed["model"]["quantization"])
