"""Concept sliders (model.slider.*): the LoRA at +1 regresses onto neutral + guidance x (positive - negative)
and at -1 onto the opposite; a trained slider moves the prediction along that direction at positive
strengths and against it at negative ones, the file does the same at negative strengths in a pipeline
and in `lorafit grid`, and the run resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from network_reference import pipeline
from PIL import Image
from training import tiny_batch, train

import lorafit
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.networks.adapter_switch import adapter_strength, adapters_disabled
from lorafit.training.module import LoraDiffusionModule

SLIDER = {"positive": "a white star", "negative": "a black star", "target": "a star", "guidance": 2.0}


def _module(model: str, **kwargs) -> LoraDiffusionModule:
    module = LoraDiffusionModule(model=model, rank=4, **kwargs)
    module.configure_model()
    module.train()
    return module


def _perturb(module: LoraDiffusionModule) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the LoRA would equal the base
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def _normalized_like(tensor, reference):
    # Written out per sample, against the module's vectorised version.
    rows = [(t - t.mean()) / (t.std() + 1e-8) * r.std() + r.mean() for t, r in zip(tensor, reference)]
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_the_slider_loss_is_the_written_out_objective(family, tiny_models, demo_data):
    batch = tiny_batch(demo_data, 2)
    module = _module(tiny_models[family], slider=SLIDER)
    _perturb(module)
    with torch.no_grad():
        loss = module.denoising_loss(batch, torch.Generator().manual_seed(1))
        step, device = module.step, module.device
        generator = torch.Generator().manual_seed(1)
        draw = step.objective.draw(step.latents(batch, generator, device), generator)

        def predict(prompt: str) -> torch.Tensor:
            conditioning = step.family.encode_text(step.base, [prompt] * 2, step.options, device)
            return step.family.predict(step.base, draw.noisy, draw.timesteps, conditioning, batch, step.options)

        adapted = list(module.lora_components().values())
        with adapters_disabled(adapted):
            positive, negative, neutral = predict("a white star"), predict("a black star"), predict("a star")
        up = _normalized_like(neutral + 2.0 * (positive - negative), neutral)
        down = _normalized_like(neutral - 2.0 * (positive - negative), neutral)
        at_plus = predict("a star")
        for name, p in module.named_parameters():  # strength -1 of a LoRA: its B negated
            if "lora_B" in name:
                p.data.neg_()
        at_minus = predict("a star")
    assert not torch.allclose(at_plus, neutral)
    expected = (((at_plus - up) ** 2).mean() + ((at_minus - down) ** 2).mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


def _predict(module: LoraDiffusionModule, batch: dict, draw, prompt: str) -> torch.Tensor:
    step, size = module.step, len(batch["captions"])
    conditioning = step.family.encode_text(step.base, [prompt] * size, step.options, module.device)
    return step.family.predict(step.base, draw.noisy, draw.timesteps, conditioning, batch, step.options)


def _direction_scores(module: LoraDiffusionModule, batch: dict, strengths=(-1.0, 1.0)) -> list[float]:
    """How far the LoRA at each strength moves the neutral prediction along the base's positive - negative
    direction (cosine similarity, averaged over a few noise draws)."""
    step, adapted = module.step, list(module.lora_components().values())
    scores = {s: [] for s in strengths}
    with torch.no_grad():
        for seed in range(4):
            generator = torch.Generator().manual_seed(100 + seed)
            draw = step.objective.draw(step.latents(batch, generator, module.device), generator)
            with adapters_disabled(adapted):
                direction = _predict(module, batch, draw, SLIDER["positive"]) - _predict(
                    module, batch, draw, SLIDER["negative"]
                )
                neutral = _predict(module, batch, draw, SLIDER["target"])
            for strength in strengths:
                with adapter_strength(adapted, strength):
                    moved = _predict(module, batch, draw, SLIDER["target"]) - neutral
                cosine = torch.nn.functional.cosine_similarity(moved.flatten(1), direction.flatten(1)).mean()
                scores[strength].append(cosine.item())
    return [sum(v) / len(v) for v in scores.values()]


def test_the_anchor_holds_its_prompt_at_the_bases_prediction_at_both_strengths(tiny_models, demo_data):
    batch = tiny_batch(demo_data, 2)
    anchored = _module(tiny_models["sd1"], slider={**SLIDER, "anchor": "a circle", "anchor_weight": 0.5})
    _perturb(anchored)
    plain = _module(tiny_models["sd1"], slider=SLIDER)
    plain.load_state_dict(anchored.state_dict(), strict=False)
    with torch.no_grad():
        term = anchored.denoising_loss(batch, torch.Generator().manual_seed(1)) - plain.denoising_loss(
            batch, torch.Generator().manual_seed(1)
        )
        generator = torch.Generator().manual_seed(1)
        draw = plain.step.objective.draw(plain.step.latents(batch, generator, plain.device), generator)
        adapted = list(plain.lora_components().values())
        with adapters_disabled(adapted):
            base = _predict(plain, batch, draw, "a circle")
        errors = []
        for strength in (1.0, -1.0):
            with adapter_strength(adapted, strength):
                errors.append(((_predict(plain, batch, draw, "a circle") - base) ** 2).mean())
    assert term.item() > 0
    torch.testing.assert_close(term, 0.5 * (errors[0] + errors[1]) / 2, rtol=1e-3, atol=1e-7)


def test_image_pairs_denoise_the_right_half_at_plus_one_and_the_left_at_minus_one(tiny_models, demo_data):
    batch = tiny_batch(demo_data, 2)
    module = _module(tiny_models["sd1"], slider={"image_pairs": True})
    _perturb(module)
    with torch.no_grad():
        loss = module.denoising_loss(batch, torch.Generator().manual_seed(1))
        step, device = module.step, module.device
        generator = torch.Generator().manual_seed(1)
        latents = step.latents(batch, generator, device)
        less, more = latents[..., :4], latents[..., 4:]  # 64 px pictures: 8 latents wide
        timesteps = step.objective.draw(more, generator).timesteps
        noise = torch.randn(more.shape, generator=generator)
        conditioning = step.family.encode_text(step.base, batch["captions"], step.options, device)
        scheduler = step.objective.noise_scheduler

        def predict(half: torch.Tensor) -> torch.Tensor:
            noisy = scheduler.add_noise(half, noise, timesteps)
            return step.family.predict(step.base, noisy, timesteps, conditioning, batch, step.options)

        at_plus = predict(more)
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data.neg_()
        at_minus = predict(less)
    assert step.base.prediction_type == "epsilon"  # the target is the noise, shared by both halves
    expected = (((at_plus - noise) ** 2).mean() + ((at_minus - noise) ** 2).mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_a_trained_slider_moves_the_prediction_its_way_at_both_signs(tiny_models, demo_data, tmp_path):
    """A few steps on the tiny SD1 model: at +1 the LoRA pushes the neutral prompt's prediction towards
    the positive prompt's (relative to the negative's), at -1 away from it; the untrained LoRA did neither."""
    _, module = train(tiny_models["sd1"], demo_data, tmp_path, max_epochs=3, learning_rate=2e-2, slider=SLIDER)
    minus, plus = _direction_scores(module, tiny_batch(demo_data, 2))
    assert plus > 0.3 and minus < -0.3, (minus, plus)


def test_a_slider_run_resumes_exactly_with_a_text_encoder_lora(tiny_models, demo_data, tmp_path):
    kwargs = dict(batch_size=2, learning_rate=5e-3, train_text_encoder=True, slider=SLIDER)
    _, straight = train(tiny_models["sd1"], demo_data, tmp_path / "straight", max_epochs=2, **kwargs)
    train(tiny_models["sd1"], demo_data, tmp_path / "stopped", max_epochs=1, **kwargs)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    _, resumed = train(
        tiny_models["sd1"], demo_data, tmp_path / "stopped", max_epochs=2, ckpt_path=str(checkpoint), seed=5, **kwargs
    )
    a = {k: v for k, v in straight.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert any("text_encoder" in k for k in a) and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed slider run diverged"


@pytest.mark.slow
def test_the_exported_slider_works_at_negative_strengths_in_a_pipeline_and_the_grid(tiny_models, demo_data, tmp_path):
    """The file at -1 in a diffusers pipeline is the training module at -1, and `lorafit grid
    --strength -1 --strength 0 --strength 1` renders three different rows."""
    _, module = train(tiny_models["sd1"], demo_data, tmp_path, max_epochs=1, learning_rate=2e-2, slider=SLIDER)
    pipe = pipeline(tiny_models["sd1"])
    lorafit.load_lora(pipe, tmp_path / "lora" / "test.safetensors", weight=-1.0, adapter_name="slider")
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad(), adapter_strength([module.unet], -1.0):
        trained_at_minus = module.unet(sample, torch.tensor([500]), hidden).sample
        loaded_at_minus = pipe.unet(sample, torch.tensor([500]), hidden).sample
        lorafit.set_lora_weight(pipe, "slider", 1.0)
        loaded_at_plus = pipe.unet(sample, torch.tensor([500]), hidden).sample
    assert (loaded_at_plus - loaded_at_minus).abs().max() > 1e-3
    torch.testing.assert_close(loaded_at_minus, trained_at_minus, rtol=1e-4, atol=1e-5)

    out = tmp_path / "grid"
    strengths = ["-1", "0", "1"]
    argv = ["grid", tiny_models["sd1"], "--lora", str(tmp_path / "lora" / "test.safetensors"), "--prompt", "a star"]
    for value in strengths:
        argv += ["--strength", value]
    main([*argv, "--render.steps", "2", "--render.cfg", "1", "--base.device", "cpu", "--out", str(out)])
    cells = {s: Image.open(next((out / "cells").glob(f"test_s{s}_*.png"))) for s in strengths}
    pixels = {s: np.asarray(image) for s, image in cells.items()}
    assert not np.array_equal(pixels["-1"], pixels["0"]) and not np.array_equal(pixels["-1"], pixels["1"])
    assert "<lora:test:-1>" in cells["-1"].text["parameters"]  # as A1111 writes a negative weight


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"slider": {"positive": "a smile"}}, r"^model\.slider\.negative: a slider needs both ends"),
        ({"slider": {**SLIDER, "negative": SLIDER["positive"]}}, r"^model\.slider\.negative: the same prompt"),
        ({"slider": {**SLIDER, "guidance": 0}}, r"^model\.slider\.guidance: 0 must be > 0"),
        ({"slider": SLIDER, "network": {"type": "dora"}}, r"^model\.network\.type: a DoRA's strength"),
        ({"slider": SLIDER, "memory": {"gradient_checkpointing": True}}, r"^model\.memory\.gradient_checkpointing"),
        ({"slider": SLIDER, "prior": {"weight": 1.0, "class_word": "x"}}, r"^model\.prior\.weight: .*slider"),
        ({"slider": {**SLIDER, "image_pairs": True}}, r"^model\.slider\.image_pairs: .*leave model\.slider\.positive"),
    ],
)
def test_impossible_slider_settings_are_refused_in_one_line(settings, message, tiny_models):
    with pytest.raises(LorafitError, match=message):
        LoraDiffusionModule(model=tiny_models["sd1"], **settings)


def test_a_slider_on_cached_text_embeddings_is_refused(tiny_models):
    module = _module(tiny_models["sd1"], slider=SLIDER)
    with pytest.raises(LorafitError, match=r"^model\.slider\.positive: .*cached text embeddings"):
        module.check_cache({"family": "sd1", "model": tiny_models["sd1"], "text_embeddings": True})


def test_image_pairs_refuse_flips_which_would_swap_the_halves(tiny_models, demo_data, tmp_path):
    with pytest.raises(LorafitError, match=r"^data\.flip_aug: would swap or shift the halves"):
        train(
            tiny_models["sd1"],
            demo_data,
            tmp_path,
            max_steps=1,
            slider={"image_pairs": True},
            data_kwargs={"flip_aug": True},
        )
