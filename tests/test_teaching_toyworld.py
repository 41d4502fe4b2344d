"""The teaching methods measured on the toy world (lorafit/toyworld): each changes what the judge sees
the way docs/teaching-methods.md says, not only the files it writes."""

from __future__ import annotations

import itertools

import pytest
import torch
from training import train

from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.method_data import (
    background_luminance,
    write_brightness_pairs,
    write_masked_concept,
    write_world_folder,
)
from lorafit.toyworld.world import COLOUR_NAMES, HELD_OUT_SHAPE, TRIGGER

pytestmark = pytest.mark.slow  # toy-world trainings of a few minutes each

TOY_DATA = dict(resolution=32, min_bucket_reso=32, max_bucket_reso=32, bucket_reso_steps=32)
# configs/demo.yaml's recipe (rank 8, the full preset, text encoder trained), shorter.
TOY_RECIPE = dict(
    rank=8,
    alpha=8,
    target_preset="full",
    learning_rate=4e-3,
    weight_decay=0.0,
    train_text_encoder=True,
    text_encoder_lr=2e-3,
)


def _toy_train(data, root, epochs: int, toy_data: dict = TOY_DATA, **kwargs):
    torch.set_num_threads(1)
    settings = {**TOY_RECIPE, **kwargs}
    train(str(ev.BASE_DIR), str(data), root, max_epochs=epochs, batch_size=16, data_kwargs=toy_data, **settings)
    return root / "lora" / "test.safetensors"


def _black_share(pipe, cases) -> float:
    return sum(v.background == "black" for v in ev.score(pipe, cases).verdicts) / len(cases)


def test_masks_on_the_star_untie_the_trigger_from_the_training_pictures_background(tmp_path):
    """Stars of every colour, all on black, captioned "a red ohwx" (background unnamed). Trained
    without masks, "a red ohwx" then comes out on black every time (measured 100%, the base: 12.5%);
    with each star's mask and floor 0 the background is much less tied to it (measured 76%)."""
    data = write_masked_concept(tmp_path / "data", background="black")
    unmasked = _toy_train(data, tmp_path / "unmasked", epochs=8, loss={"mask_floor": 1.0})
    masked = _toy_train(data, tmp_path / "masked", epochs=8, loss={"mask_floor": 0.0})
    colours = [c for c in COLOUR_NAMES if c != "black"] * 16
    cases = [ev.Case(f"a {c} {TRIGGER}", HELD_OUT_SHAPE, c, "black", 7000 + i) for i, c in enumerate(colours)]
    pipe = ev.load_pipeline()
    base = _black_share(pipe, cases)
    ev.apply_lora(pipe, unmasked)
    tied = _black_share(pipe, cases)
    ev.apply_lora(pipe, masked)
    untied = _black_share(pipe, cases)
    assert tied >= 0.9 and base <= 0.3, (base, tied, untied)
    assert untied <= tied - 0.1, (base, tied, untied)


def test_a_brightness_slider_moves_the_background_monotonically_with_strength(tmp_path):
    """A slider from "... on a white background" / "... on a black background", 60 steps on world
    pictures: on prompts with coloured backgrounds the border luminance rises strictly from strength
    -1 to 1 (measured 90, 113, 136, 172, 238), the judge sees white backgrounds at +1 (the base: none)
    and some black ones at -1 (measured 2 of 16; the darkening side is the weaker at 60 steps)."""
    data = write_world_folder(tmp_path / "data", num_images=64, repeats=5, seed=1)
    slider = {"positive": "a red circle on a white background", "negative": "a red circle on a black background"}
    lora = _toy_train(data, tmp_path / "slider", epochs=3, slider=slider)
    cases = [c for c in ev.in_world_cases(64) if c.background not in ("white", "black")][:16]
    pipe = ev.load_pipeline()
    ev.apply_lora(pipe, lora, 0.0)
    luminance, seen = [], {}
    for strength in (-1.0, -0.5, 0.0, 0.5, 1.0):
        ev.set_lora_strength(pipe, strength)
        pictures = ev.generate(pipe, cases)
        luminance.append(sum(background_luminance(pictures)) / len(cases))
        seen[strength] = [v.background for v in ev.judge_pictures(pictures, cases).verdicts]
    assert all(b > a for a, b in itertools.pairwise(luminance)), luminance
    assert luminance[0] < luminance[2] - 25 and luminance[-1] > luminance[2] + 50, luminance
    assert seen[1.0].count("white") > seen[0.0].count("white") + 4, (luminance, seen)
    assert seen[-1.0].count("black") > seen[0.0].count("black"), (luminance, seen)


def test_a_slider_from_image_pairs_moves_the_background_monotonically_with_strength(tmp_path):
    """The same scene on black (left) and on white (right), captioned with another background, 60 steps
    of model.slider.image_pairs: the border luminance of coloured-background prompts rises strictly
    from strength -1 to 1 (measured 108, 126, 136, 141, 148; a plain LoRA on the same pictures: 127,
    129, 136, 138, 136, not monotonic)."""
    data = write_brightness_pairs(tmp_path / "data", num_images=64, repeats=5)
    pairs = dict(TOY_DATA, resolution=48, max_bucket_reso=64)  # 64x32 pictures, each half 32x32
    lora = _toy_train(data, tmp_path / "pairs", epochs=3, slider={"image_pairs": True}, toy_data=pairs)
    cases = [c for c in ev.in_world_cases(64) if c.background not in ("white", "black")][:16]
    pipe = ev.load_pipeline()
    ev.apply_lora(pipe, lora, 0.0)
    luminance = []
    for strength in (-1.0, -0.5, 0.0, 0.5, 1.0):
        ev.set_lora_strength(pipe, strength)
        luminance.append(sum(background_luminance(ev.generate(pipe, cases))) / len(cases))
    assert all(b > a for a, b in itertools.pairwise(luminance)), luminance
    assert luminance[-1] - luminance[0] > 20, luminance
