"""One rendering-options type for generate / grid / probe / training samples: grouped flags, old
spellings with a notice, one file shared by all, values checked before a model loads, progress bars."""

from __future__ import annotations

import re

import pytest
import yaml
from network_reference import pipeline
from PIL import Image
from test_load_lora import _foreign_kohya_file

from lorafit.cli import main
from lorafit.cli.renamed import rename_fit_args, rename_flags
from lorafit.errors import LorafitError
from lorafit.inference.grid import grid
from lorafit.inference.render_options import RenderOptions

ETA = re.compile(r"100%\|[^|]*\| (\d+)/\1 \[\d\d:\d\d<00:00")  # tqdm's "done" line: count, elapsed<remaining


def test_old_flat_flags_still_work_with_one_notice(tiny_models, tmp_path, capsys):
    out = tmp_path / "old"
    argv = ["generate", tiny_models["sd1"], "--prompt", "a cat", "--out", str(out)]
    main([*argv, "--steps", "1", "--seed", "3", "--seed", "4", "--device", "cpu", "--hires-scale", "1.5"])
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if "renamed option" in line]
    assert notices == [
        (
            "WARNING lorafit.cli: renamed options --steps -> --render.steps, --seed -> --render.seed, "
            "--device -> --base.device, --hires_scale -> --render.hires_scale; the old spelling still works"
        )
    ]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-3.png", "00001-4.png"]
    assert all(Image.open(p).size == (96, 96) for p in out.glob("*.png"))
    assert rename_flags(["--loras", "run", "--seed+", "5", "--cfg=4"], grid.renamed_flags) == [
        "--lora",
        "run",
        "--render.seed+",
        "5",
        "--render.cfg=4",
    ]


def test_a_render_file_read_by_the_tools(tiny_models, tmp_path, capsys):
    render = tmp_path / "render.yaml"
    render.write_text("sampler: ddim\nsteps: 2\nseed: [1, 2]\ncfg: 4\n")
    out = tmp_path / "gen"
    argv = ["generate", tiny_models["sd1"], "--prompt", "a cat", "--render", str(render), "--out"]
    main([*argv, str(out), "--render.steps", "1"])  # a flag after the file wins
    main([*argv, str(out)])
    first, _, third, _ = (Image.open(p).text["parameters"] for p in sorted(out.glob("*.png")))
    assert "Steps: 1, Sampler: DDIM, CFG scale: 4, Seed: 1," in first
    assert "Steps: 2, Sampler: DDIM, CFG scale: 4, Seed: 1," in third
    assert "renamed" not in capsys.readouterr().err


@pytest.mark.slow
def test_an_old_config_with_flat_sample_keys_still_resumes(tiny_models, demo_data, tmp_path, capsys):
    """A config.yaml written before the grouping (samples.steps, ...) parses, with one line saying what moved."""
    old = tmp_path / "config.yaml"
    old.write_text(
        f"model:\n  model: {tiny_models['sd1']}\ndata:\n  train_dir: {demo_data}\n"
        "samples:\n  prompts: [a cat]\n  sampler: ddim\n  steps: 5\n  seed: 3\n  width: null\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old), "--samples.cfg", "4.5", "--print_config"])
    captured = capsys.readouterr()
    render = yaml.safe_load(captured.out)["samples"]["render"]
    assert (render["sampler"], render["steps"], render["cfg"], render["seed"]) == ("ddim", 5, 4.5, 3)
    assert f"{old}: renamed options samples.sampler -> samples.render.sampler, samples.steps" in captured.err
    assert "--samples.cfg -> --samples.render.cfg" in captured.err
    # The tools' render file is the training samples' too.
    render = tmp_path / "render.yaml"
    render.write_text("sampler: ddim\nsteps: 2\nseed: [1, 2]\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old), "--samples.render", str(render), "--print_config"])
    shared = yaml.safe_load(capsys.readouterr().out)["samples"]["render"]
    assert (shared["sampler"], shared["steps"], shared["seed"]) == ("ddim", 2, [1, 2])
    both = tmp_path / "both.yaml"
    both.write_text("samples:\n  steps: 5\n  render:\n    steps: 6\n")
    with pytest.raises(LorafitError, match="both samples.render.steps and its old spelling are set; keep one"):
        rename_fit_args(["--config", str(both)], {"samples.steps": "samples.render.steps"})


def test_values_are_checked_before_a_model_loads():
    with pytest.raises(LorafitError, match="render.sampler: unknown sampler 'eulr'"):
        RenderOptions(sampler="eulr")
    with pytest.raises(LorafitError, match="render.width: 70; use a positive multiple of 8 pixels"):
        RenderOptions(width=70)
    with pytest.raises(LorafitError, match="render.seed: give at least one value"):
        RenderOptions(seed=[])
    with pytest.raises(LorafitError, match=r"render.hires_scale: 0.5; use >= 1"):
        RenderOptions(hires_scale=0.5)
    options = RenderOptions(seed=[1, 2], cfg=5, width=96)
    assert options.seeds == (1, 2) and options.cfgs == (5.0,) and options.size(64) == (96, 96)
    assert RenderOptions(height=48).size(64) == (64, 48)


def test_generate_grid_and_probe_show_progress_with_an_eta(tiny_models, tmp_path, capsys):
    model = tiny_models["sd1"]
    common = ["--render.steps", "1", "--base.device", "cpu"]
    main(
        [
            "generate",
            model,
            "--prompt",
            "a cat",
            "--render.seed",
            "1",
            "--render.seed",
            "2",
            *common,
            "--out",
            str(tmp_path),
        ]
    )
    assert ETA.search(capsys.readouterr().err).group(1) == "2"
    lora = _foreign_kohya_file(pipeline(model), "sd1", tmp_path / "x.safetensors")
    capsys.readouterr()  # the test's own pipeline load may print transformers' loading bar: not grid's output
    grid_argv = ["grid", model, "--lora", str(lora), "--prompt", "a", "--prompt", "b", "--z", "prompt"]
    main([*grid_argv, "--strength", "0.5", "--strength", "1", *common, "--out", str(tmp_path / "grid")])
    assert ETA.search(capsys.readouterr().err).group(1) == "4"
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\n")
    main(["probe", model, "--data", str(captions), "--render.seed", "0", *common, "--out", str(tmp_path / "probe")])
    captured = capsys.readouterr()
    assert ETA.search(captured.err).group(1) == "2"  # the caption and the control prompt
    assert "100%" not in captured.out  # stdout keeps only the results
