"""A NaN/Inf loss stops training with one clear line (or is skipped), and no bad LoRA file is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from training import DeferNonfiniteChecks, logged_metrics, train, unet_output

from lorafit.cli import main
from lorafit.training.module import LoraDiffusionModule
from lorafit.training.nonfinite import NonFiniteLossError


class StepsStarted(Callback):
    def __init__(self):
        self.started = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started.append(trainer.global_step)


class InfGradient(Callback):
    """An Inf gradient at step 1 (the loss stays finite): AdamW's update turns the weights NaN."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("inf"))


@pytest.fixture
def inf_loss_at_step(monkeypatch):
    """Make the training loss infinite at the given optimizer step(s)."""

    def poison(*steps: int):
        original = LoraDiffusionModule.denoising_loss

        def denoising_loss(self, *args, **kwargs):
            loss = original(self, *args, **kwargs)
            if self.training and self.trainer.global_step in steps:
                return loss * float("inf")
            return loss

        monkeypatch.setattr(LoraDiffusionModule, "denoising_loss", denoising_loss)

    return poison


def test_injected_inf_stops_with_a_message_and_the_last_export_still_loads(
    inf_loss_at_step, tiny_models, demo_data, tmp_path
):
    class Remember(Callback):
        """The UNet's output just before the bad step (global step 2)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.before_bad_step = unet_output(pl_module.unet)

    inf_loss_at_step(2)
    remember = Remember()
    with pytest.raises(NonFiniteLossError) as error:
        train(
            tiny_models["sdxl"],
            demo_data,
            tmp_path,
            max_epochs=10,
            max_steps=6,
            batch_size=1,
            export={"every_n_steps": 1, "every_n_epochs": 0},
            trainer_kwargs={"callbacks": [remember]},
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("loss is inf at step 2 (epoch 0, batch 2, samples: ")
    assert ".png" in message, "the message names the images of the batch"
    assert "learning rate too high" in message and "fp16" in message and "nonfinite_loss: skip" in message

    lora = tmp_path / "lora"
    assert sorted(p.name for p in lora.glob("*.safetensors")) == [
        "test-step-000001.safetensors",
        "test-step-000002.safetensors",
    ]
    assert not (lora / "test.safetensors").exists(), "no final export after a stop"
    assert not list(lora.rglob("*.tmp"))
    # The last file holds exactly the weights from before the bad step.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sdxl"])
    pipe.load_lora_weights(str(lora / "diffusers" / "test-step-000002.safetensors"))
    torch.testing.assert_close(unet_output(pipe.unet), remember.before_bad_step, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(t).all() for t in load_file(str(lora / "test-step-000002.safetensors")).values())


@pytest.mark.parametrize("deferred", [False, True], ids=["cpu-reads-at-once", "gpu-style-one-step-late"])
def test_a_bad_step_stops_the_run_without_any_export(deferred, inf_loss_at_step, tiny_models, demo_data, tmp_path):
    """On the CPU the bad loss stops the run before its update; checked a step late (no GPU stall),
    the run stops at the end of the next step. Both name the bad step."""
    inf_loss_at_step(1)
    steps = StepsStarted()
    with pytest.raises(NonFiniteLossError, match=r"^loss is inf at step 1 \(epoch 0, batch 1, samples: "):
        train(
            tiny_models["sd1"],
            demo_data,
            tmp_path,
            max_epochs=10,
            max_steps=6,
            batch_size=1,
            trainer_kwargs={"callbacks": [steps, *([DeferNonfiniteChecks()] if deferred else [])]},
        )
    assert steps.started == ([0, 1, 2] if deferred else [0, 1])
    assert not list((tmp_path / "lora").rglob("*.safetensors"))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_overflowing_learning_rate_stops_the_run(tiny_models, demo_data, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"LoRA weights became NaN/Inf after step|loss is (nan|inf)"):
        train(
            tiny_models["sd1"],
            demo_data,
            tmp_path,
            max_epochs=10,
            max_steps=6,
            batch_size=1,
            learning_rate=1e30,
            export={"every_n_steps": 1},
        )
    for path in (tmp_path / "lora").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
    assert not (tmp_path / "lora" / "test.safetensors").exists()


@pytest.mark.parametrize(
    ("mode", "deferred"),
    [("stop", False), ("stop", True), ("skip", False)],
    ids=["cpu-reads-at-once", "gpu-style-one-step-late", "skip-mode"],
)
def test_nan_weights_from_a_finite_loss_stop_before_they_are_exported(mode, deferred, tiny_models, demo_data, tmp_path):
    """An Inf gradient (finite loss) turns AdamW's update into NaN: the error names the step whose
    update it was (not the next batch, whose images are fine), and nothing from it is exported. Skip
    mode stops too: NaN weights would make it skip every batch after them."""
    with pytest.raises(NonFiniteLossError, match=r"^LoRA weights became NaN/Inf after step 1 \(epoch 0, batch 1"):
        train(
            tiny_models["sd1"],
            demo_data,
            tmp_path,
            max_epochs=10,
            max_steps=6,
            batch_size=1,
            nonfinite_loss=mode,
            export={"every_n_steps": 1, "every_n_epochs": 0},
            trainer_kwargs={"callbacks": [InfGradient(), *([DeferNonfiniteChecks()] if deferred else [])]},
        )
    assert sorted(p.name for p in (tmp_path / "lora").glob("*.safetensors")) == ["test-step-000001.safetensors"]


def test_skip_mode_drops_the_batch_counts_it_and_finishes(inf_loss_at_step, tiny_models, demo_data, tmp_path):
    inf_loss_at_step(1, 3)
    _, module = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=4,
        batch_size=1,
        log_metrics=True,
        nonfinite_loss="skip",
    )
    assert module.nonfinite.skipped >= 2
    assert max(logged_metrics(tmp_path, "loss/skipped_nonfinite").values()) == module.nonfinite.skipped
    assert (tmp_path / "lora" / "test.safetensors").is_file()
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["lorafit"]["skipped_nonfinite"] == module.nonfinite.skipped


def test_cli_prints_the_stop_as_one_line(tiny_models, demo_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(Path(__file__).resolve().parents[1] / "configs" / "tiny-demo.yaml"),
                "--model.model",
                tiny_models["sdxl"],
                "--data.train_dir",
                demo_data,
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.max_steps",
                "3",
                "--model.learning_rate",
                "1e30",
                "--trainer.logger",
                "false",
            ]
        )
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorafit: error:")]
    assert len(err) == 1 and ("NaN/Inf" in err[0] or "loss is" in err[0]), err
