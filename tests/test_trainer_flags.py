"""Trainer flags a user may set work with lorafit's callbacks; what a run prints and logs is lorafit's own."""

from __future__ import annotations

import pytest
import yaml
from cli_runs import demo_fit_args, run_lorafit
from test_cli_messages import NOISE

pytestmark = pytest.mark.slow


def test_flags_that_change_the_loop_work_together_and_no_checkpointing_means_no_checkpoint(
    tiny_models, demo_data, tmp_path
):
    root = tmp_path / "run"
    flags = {
        "--trainer.enable_checkpointing": "false",
        "--trainer.logger": "false",
        "--trainer.accumulate_grad_batches": "2",
        "--trainer.limit_train_batches": "0.5",
        "--trainer.val_check_interval": "0.5",
        "--trainer.max_time": "00:00:30:00",
    }
    args = demo_fit_args(tiny_models["sd1"], demo_data, root, "--data.val_dir", demo_data, "--samples.prompts", "[]")
    result = run_lorafit(*args, *flags_list(flags), "--trainer.max_epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "trainer.enable_checkpointing is false: no checkpoints" in result.stderr
    assert not (root / "checkpoints").exists() and not list(root.rglob("*.ckpt"))
    assert (root / "lora" / "ohwx-star.safetensors").is_file()
    assert not list(root.rglob("events.out.tfevents.*"))  # logger: false

    resumed = run_lorafit(*args, *flags_list(flags), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1].startswith("lorafit: error: --ckpt_path last looks for the run's")


def flags_list(flags: dict[str, str]) -> list[str]:
    return [item for pair in flags.items() for item in pair]


def test_a_two_epoch_run_counts_epochs_from_one_shows_the_run_eta_and_logs_its_config_once(
    tiny_models, demo_data, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    root = tmp_path / "run"
    args = demo_fit_args(tiny_models["sd1"], demo_data, root, "--samples.prompts", "[]", "--trainer.max_epochs", "2")
    args[args.index("--trainer.enable_progress_bar") + 1] = "true"
    # Lightning saved last.ckpt only after a validation round, which this run never has.
    result = run_lorafit(*args, "--trainer.check_val_every_n_epoch", "2", "--data.batch_size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt").is_file()

    # Without a terminal Rich prints the final state only: the last epoch (Lightning: "Epoch 1/1").
    assert "Epoch 2/2" in result.stdout and "Epoch 1/1" not in result.stdout
    assert "left" in result.stdout and "v_num" not in result.stdout  # the whole run's time left
    for line in NOISE:
        assert line not in result.stdout + result.stderr, line

    (events,) = root.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "hp_metric" not in accumulator.Tags()["scalars"]  # Lightning's placeholder (-1)
    assert "loss/epoch" in accumulator.Tags()["scalars"]
    hparams = {}
    for content in accumulator.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = dict(data.session_start_info.hparams)
    assert hparams["model.network.rank"].number_value == 8 and hparams["trainer.max_epochs"].number_value == 2
    assert hparams["data.batch_size"].number_value == 4
    (hparams_yaml,) = root.rglob("hparams.yaml")
    assert yaml.safe_load(hparams_yaml.read_text())["model"]["network"]["rank"] == 8
