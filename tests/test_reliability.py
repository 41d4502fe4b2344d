"""`lorafit fit` as a careless user and an attacker try it: settings that do nothing, foreign and
broken checkpoints, a run folder in use or not writable, a full disk, pipe: commands from an
untrusted config, a damaged shard. Each ends in one line, before the model loads where it can."""

from __future__ import annotations

import errno
import os
import pickle
import resource
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import DEMO_CONFIG, REPO, demo_fit_args, lorafit_command, lorafit_env, run_lorafit
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.cli.lightning_cli import _worker_error
from lorafit.data.pipe_policy import ALLOW_ENV, refuse_untrusted_pipes
from lorafit.errors import LorafitError
from lorafit.io.run_lock import RunFolderLock
from lorafit.io.write_errors import one_line_write_error


def _fit_error(capsys, run: Path, *args: str) -> str:
    """The one stderr line of a `lorafit fit` on the demo config that stops with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO_CONFIG), "--trainer.default_root_dir", str(run), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    return err[0].removeprefix("lorafit: error: ")


@pytest.fixture
def fit_args(tiny_models, demo_data) -> list[str]:
    return ["--model.model", tiny_models["sd1"], "--data.train_dir", demo_data]


# ----------------------------------------------------------------------------- settings that do nothing


def test_settings_that_would_do_nothing_or_crash_are_one_line_and_write_nothing(tmp_path, capsys, fit_args):
    run = tmp_path / "run"
    message = _fit_error(capsys, run, *fit_args, "--trainer.max_epochs", "0")
    assert message.startswith("trainer.max_epochs is 0: the run would load the model and stop without training")
    message = _fit_error(capsys, run, *fit_args, "--trainer.max_epochs", "-1", "--trainer.max_steps", "0")
    assert message.startswith("trainer.max_steps is 0")
    message = _fit_error(capsys, run, *fit_args, "--checkpoint.every_n_train_steps", "5")
    assert message.startswith("checkpoint.every_n_train_steps 5 and checkpoint.every_n_epochs 1 are both set")
    assert "add --checkpoint.every_n_epochs 0" in message
    assert not run.exists()


@pytest.mark.parametrize(
    "key, value, start",
    [
        ("model.network.alpha", "0", "model.network.alpha: 0.0 trains nothing"),
        ("model.network.rank", "0", "model.network.rank: 0; a rank must be >= 1"),
        ("model.network.rank", "-4", "model.network.rank: -4; a rank must be >= 1"),
    ],
)
def test_a_network_that_trains_nothing_is_refused_before_the_model_loads(
    key, value, start, tmp_path, capsys, fit_args, monkeypatch
):
    """Refused with the other settings: no weights read, the run folder's config.yaml left as it was."""
    import lorafit.training.module as module

    monkeypatch.setattr(module.LoraDiffusionModule, "load_base", lambda self: pytest.fail("the model was loaded"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("kept: true\n")
    assert _fit_error(capsys, run, *fit_args, f"--{key}", value).startswith(start)
    assert (run / "config.yaml").read_text() == "kept: true\n"


# ----------------------------------------------------------------------------- --ckpt_path


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['LORAFIT_TEST_MARKER'])}",))


def test_foreign_broken_and_malicious_checkpoints_are_one_line_and_never_run(tmp_path, capsys, fit_args, monkeypatch):
    marker = tmp_path / "code-was-run"
    monkeypatch.setenv("LORAFIT_TEST_MARKER", str(marker))
    malicious = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "lorafit": {}, "payload": _RunsCode()}, malicious)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "lorafit": {}}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    run = tmp_path / "run"
    cases = {
        malicious: "is not a lorafit checkpoint: it holds pickled Python objects beyond tensors",
        foreign: "is not a lorafit checkpoint (it holds no lorafit training state)",
        truncated: "is not a lorafit checkpoint: it is truncated or corrupt",
        text: "is not a lorafit checkpoint: it is not a file torch.save wrote",
        tmp_path: "is not a file",
        tmp_path / "missing.ckpt": "does not exist",
    }
    for path, expected in cases.items():
        message = _fit_error(capsys, run, *fit_args, "--ckpt_path", str(path))
        assert message.startswith(f"--ckpt_path {path} {expected}"), message
    assert not marker.exists(), "the pickle's code ran"
    with pytest.raises(pickle.UnpicklingError):  # what lorafit meets: torch refuses the global
        torch.load(malicious, weights_only=True)
    assert not run.exists()


# ----------------------------------------------------------------------------- the run folder


def test_a_run_folder_in_use_is_refused_and_left_alone(tmp_path, capsys, fit_args):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the live run's config\n")
    with RunFolderLock(run):
        message = _fit_error(capsys, run, *fit_args)
    assert message.startswith(f"run folder {run} is in use by another lorafit run (pid {os.getpid()} on ")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert (run / "config.yaml").read_text() == "the live run's config\n"


def test_an_unwritable_run_folder_is_one_line(tmp_path, capsys, fit_args):
    (tmp_path / "file").write_text("")
    message = _fit_error(capsys, tmp_path / "file" / "run", *fit_args)
    assert message == (
        f"cannot write in the run folder {tmp_path / 'file' / 'run'} (Not a directory); "
        "choose a writable --trainer.default_root_dir"
    )


def test_failed_writes_are_recognised_whoever_reports_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # torch.save: a RuntimeError whose context is the OSError of the file write.
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as torch_error:
        torch_error.__suppress_context__ = False
        error = one_line_write_error(torch_error, run, "trainer.default_root_dir")
    assert str(error).startswith(f"cannot write a file in {run} (File too large): raise the file-size limit")
    safetensors_error = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "(No space left on device): free some space" in str(one_line_write_error(safetensors_error, run, "k"))
    denied = PermissionError(errno.EACCES, "Permission denied", str(run / "lora" / "x.safetensors"))
    assert "cannot write" in str(one_line_write_error(denied, run, "k"))
    # Reading an input one may not read is not a failed write into the run folder.
    unreadable_input = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data" / "a.png"))
    assert one_line_write_error(unreadable_input, run, "k") is None
    assert one_line_write_error(ValueError("a bug"), run, "k") is None


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_leaves_every_file_whole(tiny_models, demo_data, tmp_path):
    """The file-size limit (ulimit -f) stands in for a full disk: the same OSError reaches lorafit."""
    root = tmp_path / "run"
    limit = 300_000  # bytes: the LoRA files (~180 kB) fit, a checkpoint with its optimizer state does not

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = demo_fit_args(tiny_models["sd1"], demo_data, root, "--trainer.max_epochs", "1")
    result = subprocess.run(
        lorafit_command(*args),
        cwd=REPO,
        env=lorafit_env(),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=limited,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorafit: error: cannot write a file in {root} (File too large)"), last
    assert "Traceback" not in result.stderr
    for path in root.rglob("*.safetensors"):
        assert load_file(str(path))  # every visible file is whole
    assert not [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".partial")]


# ----------------------------------------------------------------------------- pipe: shard sources


def _run_folder_config(tmp_path, shards: str) -> Path:
    run = tmp_path / "downloaded-run"
    (run / "checkpoints").mkdir(parents=True)
    config = run / "config.yaml"
    config.write_text(f"data:\n  train_dir: null\n  shards: '{shards}'\n")
    return config


def test_pipe_from_a_run_folder_config_is_refused_before_anything_runs(tmp_path, capsys, tiny_models, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    marker = tmp_path / "command-was-run"
    config = _run_folder_config(tmp_path, f"pipe:touch {marker}; cat /dev/null")
    message = _fit_error(capsys, tmp_path / "run", "--model.model", tiny_models["sd1"], "--config", str(config))
    assert message.startswith(f"data.shards 'pipe:touch {marker}; cat /dev/null' runs a shell command")
    assert f"refuses in {config}, a config read from a run folder" in message
    assert f"{ALLOW_ENV}=1" in message
    assert not marker.exists()


def test_pipe_policy(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = _run_folder_config(tmp_path, "pipe:cat x.tar")
    data = {"shards": "pipe:cat x.tar"}
    own = tmp_path / "mine.yaml"
    own.write_text("data:\n  shards: 'pipe:cat x.tar'\n")
    refuse_untrusted_pipes(data, [str(own)])  # the user's own config: the feature
    refuse_untrusted_pipes(data, [])  # typed on the command line
    refuse_untrusted_pipes({"shards": ["a.tar", "b.tar"]}, [str(config)])  # no pipe: nothing to refuse
    with pytest.raises(LorafitError, match="a config read from a run folder"):
        refuse_untrusted_pipes(data, [str(config)])
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(LorafitError, match=r"in a SLURM job \(job 42\)"):
        refuse_untrusted_pipes({"val_shards": ["x.tar", "pipe:cat y.tar"]}, [str(own)])
    monkeypatch.setenv(ALLOW_ENV, "1")  # lorafit submit --allow_pipe
    refuse_untrusted_pipes(data, [str(config)])


# ----------------------------------------------------------------------------- damaged shards


def _damaged_shards(tmp_path) -> tuple[Path, int]:
    from lorafit.data.prepare import prepare

    out = tmp_path / "shards"
    src = tmp_path / "src" / "1_ohwx"
    src.mkdir(parents=True)
    for i in range(12):
        torch.manual_seed(i)
        pixels = (torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy()
        from PIL import Image

        Image.fromarray(pixels).save(src / f"{i:02d}.png")
        (src / f"{i:02d}.txt").write_text("ohwx")
    prepare(str(src.parent), out=str(out), resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    shard = out / "train-000000.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    return out, size


def test_a_truncated_shard_names_the_shard_and_the_sample(tmp_path):
    from lorafit.data.datamodule import LoraDataModule

    out, _ = _damaged_shards(tmp_path)
    data = LoraDataModule(shards=str(out), resolution=64, min_bucket_reso=64, max_bucket_reso=128, batch_size=1)
    data.prepare_data()
    data.setup("fit")
    with pytest.raises(LorafitError) as err:
        list(data.train_dataloader())
    message = str(err.value)
    assert message.startswith(f"shard {out / 'train-000000.tar'} is truncated or corrupt: reading stopped after sample")
    assert "of 12 (key 000000" in message and "re-run `lorafit prepare`" in message


def test_a_data_loader_workers_error_is_its_own_one_line():
    wrapped = LorafitError(
        "Caught LorafitError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nlorafit.errors.LorafitError: shard a.tar is truncated or corrupt: ...\n'
    )
    assert str(_worker_error(wrapped)) == "shard a.tar is truncated or corrupt: ..."
    plain = LorafitError("data.batch_size is 0")
    assert _worker_error(plain) is plain


@pytest.mark.slow
def test_a_truncated_shard_mid_epoch_in_a_worker_is_one_line(tiny_models, tmp_path):
    out, _ = _damaged_shards(tmp_path)
    result = run_lorafit(
        "fit",
        "--config",
        str(DEMO_CONFIG),
        "--model.model",
        tiny_models["sd1"],
        "--data.train_dir",
        "null",
        "--data.shards",
        str(out),
        "--data.num_workers",
        "1",
        "--data.batch_size",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.enable_progress_bar",
        "false",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorafit: error: shard {out / 'train-000000.tar'} is truncated or corrupt"), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / ".lorafit.lock").exists()  # released on the way out
