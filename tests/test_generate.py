"""`lorafit generate`: strength 0 is the base model bit for bit, LoRAs compose, hires fix, PNG parameters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from training import train

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.inference.generate import apply_loras, generate, load_renderer, parse_lora_spec
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.render_options import BaseModelOptions, RenderOptions
from lorafit.networks.loading import set_lora_weight

CPU = BaseModelOptions(device="cpu")
COMMON = dict(render=RenderOptions(steps=2, seed=[3]), base=CPU)


@pytest.fixture(scope="module")
def run(tiny_models, demo_data, tmp_path_factory):
    """A tiny-SDXL run with three epoch files (UNet and text-encoder LoRA, trained hard enough to show)."""
    root = tmp_path_factory.mktemp("gen-run")
    train(
        tiny_models["sdxl"],
        demo_data,
        root,
        max_epochs=3,
        learning_rate=3e-2,
        train_text_encoder=True,
        data_kwargs={"repeats": 1},
    )
    return root


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_strength_zero_is_the_base_model_bit_for_bit(run, tiny_models, tmp_path):
    model, lora = tiny_models["sdxl"], run / "lora" / "test-epoch-003.safetensors"
    (base,) = generate(model, "ohwx star, a yellow star", out=str(tmp_path / "base"), **COMMON)
    (zero,) = generate(model, "ohwx star, a yellow star", lora=[f"{lora}:0"], out=str(tmp_path / "zero"), **COMMON)
    (full,) = generate(model, "ohwx star, a yellow star", lora=[str(lora)], out=str(tmp_path / "full"), **COMMON)
    assert np.array_equal(_pixels(base), _pixels(zero))
    assert np.abs(_pixels(full).astype(int) - _pixels(base)).max() > 0
    parameters = Image.open(zero).text["parameters"]
    assert parameters.startswith("ohwx star, a yellow star <lora:test-epoch-003:0>\n")
    assert "Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64" in parameters
    assert 'Lora hashes: "test-epoch-003: ' in parameters
    assert "<lora:test-epoch-003:1>" in Image.open(full).text["parameters"]


def test_two_loras_compose_with_independent_strengths(run, tiny_models):
    first, last = (run / "lora" / f"test-epoch-00{e}.safetensors" for e in (1, 3))
    renderer = load_renderer(tiny_models["sdxl"], CPU)
    request = SamplePrompt("ohwx star").with_defaults(64, 64, 2, 7.0, 3, "euler")

    def image() -> np.ndarray:
        return np.asarray(renderer(request)).astype(int)

    base = image()
    name_first, name_last = apply_loras(renderer, [parse_lora_spec(f"{first}:1"), parse_lora_spec(str(last))])
    both = image()
    set_lora_weight(renderer.pipe, name_last, 0.0)
    only_first = image()
    set_lora_weight(renderer.pipe, name_first, 0.0)
    set_lora_weight(renderer.pipe, name_last, 1.0)
    only_last = image()
    set_lora_weight(renderer.pipe, name_last, 0.0)
    assert np.array_equal(image(), base)
    assert np.abs(both - only_first).max() > 0 and np.abs(both - only_last).max() > 0
    assert np.abs(only_first - base).max() > 0 and np.abs(only_last - base).max() > 0


def test_cli_batch_of_seeds_with_hires_fix(run, tiny_models, tmp_path, capsys):
    lora = run / "lora" / "test-epoch-001.safetensors"
    out = tmp_path / "hires"
    main(
        [
            "generate",
            tiny_models["sdxl"],
            "--prompt",
            "ohwx star --n blurry",
            "--lora",
            f"{lora}:0.8",
            "--render.seed",
            "1",
            "--render.seed",
            "2",
            "--render.steps",
            "2",
            "--render.hires_scale",
            "1.5",
            "--base.device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-1.png", "00001-2.png"]
    assert all(Image.open(f).size == (96, 96) for f in files)  # 64 px x 1.5
    assert np.abs(_pixels(files[0]).astype(int) - _pixels(files[1])).max() > 0
    parameters = Image.open(files[1]).text["parameters"]
    assert parameters.startswith("ohwx star <lora:test-epoch-001:0.8>\nNegative prompt: blurry\n")
    for field in ("Seed: 2", "Size: 64x64", "Denoising strength: 0.4", "Hires upscale: 1.5"):
        assert field in parameters
    # A second call numbers its files after the existing ones instead of overwriting them.
    main(
        [
            "generate",
            tiny_models["sdxl"],
            "--prompt",
            "ohwx star",
            "--render.seed",
            "5",
            "--render.steps",
            "1",
            "--base.device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert (out / "00002-5.png").is_file()


def test_lora_spec_and_errors(tmp_path, tiny_models, capsys):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    assert parse_lora_spec(f"{path}:0.25").strength == 0.25
    assert parse_lora_spec(str(path)).strength == 1.0
    with pytest.raises(LorafitError, match="LoRA file .*missing.safetensors does not exist"):
        parse_lora_spec(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(SystemExit):
        main(["generate", tiny_models["sdxl"], "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", tiny_models["sdxl"], "--prompt", "x --w 70"])
    assert "--prompt: --w needs a positive multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd1_sd2_with_clip_skip(family, tiny_models, tmp_path):
    # SD2 is v-prediction: its samplers must keep the model's prediction type. Clip skip 2 encodes
    # the prompt from the penultimate layer, as A1111 does, so the image changes.
    model = tiny_models[family]
    render = RenderOptions(steps=2, sampler="dpmpp_2m")
    (last,) = generate(model, "ohwx star", render=render, base=CPU, out=str(tmp_path / "a"))
    (skip,) = generate(model, "ohwx star", render=replace(render, clip_skip=2), base=CPU, out=str(tmp_path / "b"))
    assert Image.open(last).size == (64, 64)
    assert np.abs(_pixels(last).astype(int) - _pixels(skip)).max() > 0


def test_samplers_follow_the_model_config(tiny_models):
    import diffusers

    from lorafit.inference.samplers import SAMPLER_NAMES, canonical_sampler, make_scheduler

    config = diffusers.DDIMScheduler.load_config(tiny_models["sd2"], subfolder="scheduler")
    for name in SAMPLER_NAMES:
        scheduler = make_scheduler(name, config)
        assert scheduler.config.prediction_type == "v_prediction", name
        assert scheduler.config.beta_schedule == "scaled_linear", name
    assert type(make_scheduler("euler_a", config)).__name__ == "EulerAncestralDiscreteScheduler"
    assert make_scheduler("dpmpp_2m_karras", config).config.use_karras_sigmas
    assert make_scheduler("ddim", config).config.clip_sample is False
    assert canonical_sampler("K_EULER_A") == "euler_a" and canonical_sampler("dpmsolver++") == "dpmpp_2m"
