"""EMA of the adapter weights: the exported EMA file is the moving average of every step's weights,
written beside the raw file per epoch, and a resumed run ends with the same EMA as an uninterrupted one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from training import train

from lorafit.callbacks.ema import AdapterEMA
from lorafit.errors import LorafitError


class RecordWeights(pl.Callback):
    """The trainable weights after every optimizer step, by diffusers-file key."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                name.replace(".default", ""): p.detach().clone()
                for name, p in pl_module.named_parameters()
                if p.requires_grad
            }
        )


def hand_ema(steps: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA with diffusers' default ramp, written out: update n uses min(decay, (1 + k) / (10 + k)),
    k = n - 1, and copies the weights while k is 0."""
    ema = {}
    for n, weights in enumerate(steps, start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        ema = {key: w.clone() if not ema else d * ema[key] + (1 - d) * w for key, w in weights.items()}
    return ema


def test_the_ema_file_is_the_moving_average_of_every_steps_weights(tiny_models, demo_data, tmp_path):
    record = RecordWeights()
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_epochs=1,
        batch_size=4,
        learning_rate=1e-2,
        callbacks=[AdapterEMA(decay=0.5), record],
    )
    assert len(record.steps) == 5  # 20 samples a epoch (4 images x 5 repeats), batch 4
    raw = load_file(str(tmp_path / "lora" / "diffusers" / "test-epoch-001.safetensors"))
    ema = load_file(str(tmp_path / "lora" / "ema" / "diffusers" / "test-epoch-001.safetensors"))
    expected = hand_ema(record.steps, decay=0.5)
    assert raw.keys() == ema.keys() and set(expected) == set(ema)
    for key in ema:
        torch.testing.assert_close(ema[key], expected[key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(raw[key], record.steps[-1][key])  # the raw file is the last step's weights
    # The average lags behind the trained weights: the files differ where training moved them.
    assert max((ema[k] - raw[k]).abs().max().item() for k in ema if "lora_B" in k) > 1e-4
    # Every export has its twin: epoch, final, kohya and diffusers, EMA metadata in the kohya one.
    names = sorted(p.relative_to(tmp_path / "lora").as_posix() for p in (tmp_path / "lora").rglob("*.safetensors"))
    assert names == [
        "diffusers/test-epoch-001.safetensors",
        "diffusers/test.safetensors",
        "ema/diffusers/test-epoch-001.safetensors",
        "ema/diffusers/test.safetensors",
        "ema/test-epoch-001.safetensors",
        "ema/test.safetensors",
        "test-epoch-001.safetensors",
        "test.safetensors",
    ]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "ema" / "test.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["lorafit_ema_decay"] == "0.5" and metadata["lorafit_ema_updates"] == "5"


def test_the_trained_weights_are_untouched_by_the_ema_export(tiny_models, demo_data, tmp_path):
    """Exporting swaps the EMA in and back out: training goes on from its own weights, so a run with
    EMA trains exactly the raw LoRA a run without it trains."""
    kwargs = dict(max_epochs=2, batch_size=4, learning_rate=1e-2)
    train(tiny_models["sd1"], demo_data, tmp_path / "plain", **kwargs)
    train(tiny_models["sd1"], demo_data, tmp_path / "ema", callbacks=[AdapterEMA(decay=0.9)], **kwargs)
    plain = load_file(str(tmp_path / "plain" / "lora" / "test.safetensors"))
    with_ema = load_file(str(tmp_path / "ema" / "lora" / "test.safetensors"))
    assert all(torch.equal(plain[k], with_ema[k]) for k in plain)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_ema(tiny_models, demo_data, tmp_path):
    kwargs = dict(batch_size=4, learning_rate=5e-3, train_text_encoder=True)
    train(tiny_models["sd1"], demo_data, tmp_path / "straight", max_epochs=2, callbacks=[AdapterEMA(0.8)], **kwargs)
    train(tiny_models["sd1"], demo_data, tmp_path / "stopped", max_epochs=1, callbacks=[AdapterEMA(0.8)], **kwargs)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["callbacks"]
    (state,) = [value for key, value in saved.items() if key.startswith("AdapterEMA")]
    assert state["optimization_step"] == 5 and len(state["shadow_params"]) == len(state["names"])
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "stopped",
        max_epochs=2,
        ckpt_path=str(checkpoint),
        seed=99,
        callbacks=[AdapterEMA(0.8)],
        **kwargs,
    )
    expected = load_file(str(tmp_path / "straight" / "lora" / "ema" / "test.safetensors"))
    got = load_file(str(tmp_path / "stopped" / "lora" / "ema" / "test.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed EMA diverged"


@pytest.mark.parametrize("settings", [dict(decay=1.5), dict(decay=0.0), dict(decay=0.9, every_n_steps=0)])
def test_impossible_ema_settings_are_refused_in_one_line(settings):
    with pytest.raises(LorafitError, match=r"^ema\.(decay|every_n_steps)"):
        AdapterEMA(**settings)
