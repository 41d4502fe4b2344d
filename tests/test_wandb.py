"""W&B logging (configs/logger/wandb.yaml), offline: config and loss curves logged, same run on resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cli_runs import REPO, demo_fit_args, lorafit_env, run_lorafit

from lorafit.cli import main
from lorafit.loggers.wandb import stable_run_id

WANDB_OVERLAY = str(REPO / "configs" / "logger" / "wandb.yaml")
NO_WANDB = "import sys; sys.modules['wandb'] = None; from lorafit.cli import main; main(sys.argv[1:])"


def _run_files(root):
    return sorted((root / "wandb").glob("offline-run-*/run-*.wandb"))


def _history(records) -> dict[int, float]:
    steps = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            # W&B stores "a/b" keys as nested_key ["a", "b"].
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "loss/current" in items:
                steps[items["trainer/global_step"]] = items["loss/current"]
    return steps


@pytest.mark.slow
def test_offline_run_logs_config_and_loss_and_a_resume_continues_the_same_run(tiny_models, demo_data, tmp_path):
    from wandb_records import wandb_records  # needs wandb: a dev dependency (the `wandb` extra)

    root = tmp_path / "run"
    args = [
        *demo_fit_args(
            tiny_models["sd1"],
            demo_data,
            root,
            "--config",
            WANDB_OVERLAY,  # offline: false, while WANDB_MODE=offline makes the run offline
            "--model.train_text_encoder",
            "false",
            "--data.batch_size",
            "4",
        )
    ]
    first = run_lorafit(*args, "--trainer.max_epochs", "1", WANDB_MODE="offline")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_lorafit(*args, "--trainer.max_epochs", "2", "--ckpt_path", "last", WANDB_MODE="offline")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    runs = _run_files(root)
    assert len(runs) == 2, runs  # one offline run directory per process start ...
    records = [wandb_records(path) for path in runs]
    ids = {r.run.run_id for run in records for r in run if r.WhichOneof("record_type") == "run"}
    assert ids == {stable_run_id(root)}  # ... both for the same W&B run, which `wandb sync` joins

    config = {}
    for record in records[0]:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    # The whole config once, by section; not also Lightning's flattened copy of the model's arguments.
    assert {"model", "data", "trainer", "export", "samples"} <= config.keys()
    assert not {"rank", "learning_rate", "config", "hp_metric"} & config.keys()
    assert config["model"]["network"]["rank"] == 8 and config["data"]["batch_size"] == 4
    assert config["trainer"]["default_root_dir"] == str(root)
    wandb_settings = config["trainer"]["logger"]["init_args"]
    assert wandb_settings["offline"] is True  # what the run did (WANDB_MODE), not the config's false
    assert wandb_settings["id"] == stable_run_id(root)

    # 20 samples / batch 4 = 5 steps per epoch: the resumed run's curve continues where the first ended.
    first_curve, second_curve = _history(records[0]), _history(records[1])
    assert sorted(first_curve) == [0, 1, 2, 3, 4] and sorted(second_curve) == [5, 6, 7, 8, 9]
    assert all(0 < loss < 10 for loss in [*first_curve.values(), *second_curve.values()])


def test_without_wandb_the_overlay_fails_in_one_line_naming_the_extra(
    tiny_models, demo_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(demo_fit_args(tiny_models["sd1"], demo_data, tmp_path / "run", "--config", WANDB_OVERLAY))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "lorafit: error: trainer.logger: W&B logging needs the wandb package: pip install lorafit[wandb]"
    ), err
    assert not (tmp_path / "run" / "lora").exists()


@pytest.mark.slow
def test_without_wandb_training_with_tensorboard_works(tiny_models, demo_data, tmp_path):
    args = demo_fit_args(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "run",
        "--trainer.max_steps",
        "2",
        "--model.train_text_encoder",
        "false",
    )
    result = subprocess.run(
        [sys.executable, "-c", NO_WANDB, *args],
        cwd=REPO,
        env=lorafit_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "lora" / "ohwx-star.safetensors").is_file()
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))
