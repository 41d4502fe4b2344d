"""The teaching methods measured on the toy world (lorafit/toyworld): each changes what the judge sees
the way docs/teaching-methods.md says, not only the files it writes."""

from __future__ import annotations

import pytest
import torch
from training import train

from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.method_data import write_masked_concept
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


def _toy_train(data, root, epochs: int, **kwargs):
    torch.set_num_threads(1)
    settings = {**TOY_RECIPE, **kwargs}
    train(str(ev.BASE_DIR), str(data), root, max_epochs=epochs, batch_size=16, data_kwargs=TOY_DATA, **settings)
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
