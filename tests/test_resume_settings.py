"""Resuming with changed model settings: the network's identity is refused in one line, the recipe
(learning rates ...) is taken from the config, whether --ckpt_path is `last` or a file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from cli_runs import demo_fit_args, run_lorafit, tensorboard_scalars

from lorafit.training.resume_settings import changed_network_settings


@pytest.fixture(scope="module")
def one_epoch_run(tiny_models, demo_data, tmp_path_factory) -> tuple[Path, str, str]:
    """A 1-epoch run of the demo config (LoRA rank 8, alpha 4, learning rate 1e-3, text encoders trained)."""
    root = tmp_path_factory.mktemp("resume") / "run"
    result = run_lorafit(
        *demo_fit_args(tiny_models["sdxl"], demo_data, root, "--trainer.max_epochs", "1", "--samples.prompts", "[]")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, tiny_models["sdxl"], demo_data


def _resume(one_epoch_run, tmp_path: Path, *settings: str, ckpt: str = "last"):
    """Resumes a copy of the run for a second epoch with ``settings``; (result, run folder)."""
    original, model, data = one_epoch_run
    root = tmp_path / "run"
    shutil.copytree(original, root)
    ckpt_path = str(root / "checkpoints" / "last.ckpt") if ckpt == "file" else ckpt
    result = run_lorafit(
        *demo_fit_args(
            model,
            data,
            root,
            "--trainer.max_epochs",
            "2",
            "--samples.prompts",
            "[]",
            *settings,
            "--ckpt_path",
            ckpt_path,
        )
    )
    return result, root


def _error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("lorafit: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_resuming_last_with_another_network_type_is_refused_naming_both_values(one_epoch_run, tmp_path):
    result, root = _resume(one_epoch_run, tmp_path, "--model.network_type", "loha")
    error = _error_line(result)
    assert 'model.network.type: "lora" in the checkpoint, "loha" in the config' in error
    assert "resume with the checkpoint's settings, or start a new run" in error.lower()
    assert str(root / "checkpoints" / "last.ckpt") in error
    # Refused before the trainer started: the run's config.yaml still describes the checkpoint.
    assert yaml.safe_load((root / "config.yaml").read_text())["model"]["network"]["type"] == "lora"
    assert not (root / "lora" / "ohwx-star-epoch-002.safetensors").exists()


@pytest.mark.slow
def test_resuming_a_checkpoint_file_with_another_rank_and_alpha_is_refused(one_epoch_run, tmp_path):
    # Lightning's CLI used to replace the config by the checkpoint's settings here, silently.
    result, root = _resume(one_epoch_run, tmp_path, "--model.rank", "4", "--model.alpha", "8", ckpt="file")
    error = _error_line(result)
    assert "model.network.rank: 8 in the checkpoint, 4 in the config" in error
    assert "model.network.alpha: 4.0 in the checkpoint, 8.0 in the config" in error
    assert not (root / "lora" / "ohwx-star-epoch-002.safetensors").exists()


def _folder_state(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_a_part_losing_its_lora_through_a_zero_learning_rate_is_refused_and_the_run_folder_is_left_alone(
    one_epoch_run, tmp_path
):
    # Refused only once the network is built, inside trainer.fit: after Lightning started the
    # loggers (a new lightning_logs/version_N) and where config.yaml used to be rewritten already.
    before = _folder_state(one_epoch_run[0])
    result, root = _resume(one_epoch_run, tmp_path, "--model.text_encoder_lr", "0")
    error = _error_line(result)
    assert "parts with a LoRA" in error
    assert '["unet", "text_encoder", "text_encoder_2"] in the checkpoint, ["unet"] in the config' in error
    assert _folder_state(root) == before


@pytest.mark.slow
def test_a_changed_learning_rate_is_used_when_resuming_from_a_checkpoint_file(one_epoch_run, tmp_path):
    result, root = _resume(one_epoch_run, tmp_path, "--model.learning_rate", "0.02", ckpt="file")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "lora" / "ohwx-star-epoch-002.safetensors").is_file()
    rates = [rate for _, rate in sorted(tensorboard_scalars(root, "lr/unet").items())]
    assert len(rates) == 20  # 10 steps per epoch, logged every step
    assert rates == pytest.approx([1e-3] * 10 + [0.02] * 10)
    assert yaml.safe_load((root / "config.yaml").read_text())["model"]["optimizer"]["learning_rate"] == 0.02


def test_which_settings_count_as_changed():
    saved = {
        "network_type": "lora",
        "rank": 8,
        "alpha": 4,
        "include": None,
        "rank_pattern": {},
        "text_encoder_target_modules": ("q_proj", "v_proj"),
        "clip_skip": 1,
        "learning_rate": 1e-3,
    }
    same = {
        **saved,
        "alpha": 4.0,
        "include": [],
        "rank_pattern": None,
        "text_encoder_target_modules": ["q_proj", "v_proj"],
        "learning_rate": 0.5,
        "lokr_factor": 4,
    }
    assert changed_network_settings(saved, same, "sd1") == []  # lokr_factor: not in the checkpoint, not compared
    assert changed_network_settings(saved, {**same, "clip_skip": 2}, "sdxl") == []  # SDXL ignores clip_skip
    # Checkpoints of lorafit versions with flat keys compare against the grouped settings.
    assert changed_network_settings(saved, {**same, "clip_skip": 2}, "sd1") == [("conditioning.clip_skip", 1, 2)]
    assert changed_network_settings(saved, {**same, "include": ["ff.net"]}, "sd1") == [
        ("network.include", None, ["ff.net"])
    ]


def test_the_configured_rates_and_arguments_replace_the_saved_ones_at_the_same_point_of_the_schedule():
    import torch

    from lorafit.training.resume_settings import use_configured_optimizer_settings

    def optimizer_and_schedule(rates: dict[str, float], betas=(0.9, 0.999)):
        groups = [
            {"name": name, "lr": rate, "params": [torch.nn.Parameter(torch.ones(2))]} for name, rate in rates.items()
        ]
        optimizer = torch.optim.AdamW(groups, betas=betas)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
        return optimizer, warmup

    optimizer, schedule = optimizer_and_schedule({"unet": 1e-3, "text_encoder": 5e-4})
    for _ in range(4):  # mid-warmup: the rates are at 5/10 of their base
        optimizer.step()
        schedule.step()
    checkpoint = {"optimizer_states": [optimizer.state_dict()], "lr_schedulers": [schedule.state_dict()]}

    use_configured_optimizer_settings(checkpoint, {"unet": 2e-3, "text_encoder": 5e-4}, {"betas": (0.8, 0.99)})
    resumed, resumed_schedule = optimizer_and_schedule({"unet": 2e-3, "text_encoder": 5e-4}, betas=(0.8, 0.99))
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    resumed_schedule.load_state_dict(checkpoint["lr_schedulers"][0])
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([1e-3, 2.5e-4])  # 5/10 of 2e-3 and of 5e-4
    assert [g["betas"] for g in resumed.param_groups] == [(0.8, 0.99)] * 2
    resumed.step()
    resumed_schedule.step()
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([1.2e-3, 3e-4])  # warmup goes on: 6/10
