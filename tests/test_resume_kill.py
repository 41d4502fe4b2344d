"""Killed at any moment, training resumes to the very same LoRA, and every file on disk loads.

The run (tiny SD1, 4 images, batch 4: one step per epoch, 8 epochs) exports a LoRA and rewrites
checkpoints/last.ckpt every epoch. Resuming from an end-of-epoch checkpoint is exact: the result
is bitwise equal to an uninterrupted run. (Mid-epoch resume is exact too, since the data module
restores its position: tests/test_learning_and_resume.py.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import REPO, demo_fit_args, lora_file, lorafit_command, lorafit_env, run_lorafit
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses: DDP ranks, SLURM jobs, a browser, killed trainings

RUN_ARGS = [
    "--model.train_text_encoder",
    "false",
    "--data.repeats",
    "1",
    "--data.batch_size",
    "4",
    "--trainer.max_epochs",
    "8",
]


@pytest.fixture(scope="module")
def reference(tiny_models, demo_data, tmp_path_factory):
    """An uninterrupted run: its final LoRA, and the seconds one epoch took."""
    root = tmp_path_factory.mktemp("reference")
    result = run_lorafit(*demo_fit_args(tiny_models["sd1"], demo_data, root, *RUN_ARGS))
    assert result.returncode == 0, result.stderr[-3000:]
    first = (root / "lora" / "ohwx-star-epoch-001.safetensors").stat().st_mtime
    last = (root / "lora" / "ohwx-star-epoch-008.safetensors").stat().st_mtime
    return lora_file(root), (last - first) / 7


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        lorafit_command(*args),
        cwd=REPO,
        env=lorafit_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def _every_file_loads(root: Path) -> int:
    """Every LoRA and checkpoint under ``root`` loads; LoRA files are readable as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    files = list(root.rglob("*.safetensors"))
    for path in files:
        assert load_file(str(path)), path
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    for path in root.rglob("*.ckpt"):
        assert "state_dict" in torch.load(path, map_location="cpu", weights_only=False), path
    return len(files)


def test_kill_9_at_a_random_moment_then_resume_gives_the_same_lora(reference, tiny_models, demo_data, tmp_path):
    expected, epoch_seconds = reference
    # A random epoch, then a random moment within the next one: the kill may land in a training
    # step, an export or a checkpoint write. At least two epochs are left, so training is running.
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    epoch, delay = rng.randint(1, 6), rng.uniform(0, epoch_seconds)
    root = tmp_path / "run"
    args = demo_fit_args(tiny_models["sd1"], demo_data, root, *RUN_ARGS)
    process = _start(args)
    _wait_for(root / "lora" / f"ohwx-star-epoch-{epoch:03d}.safetensors", process)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    where = f"(kill -9 {delay:.2f}s after the epoch {epoch} export; random seed {seed})"
    assert process.returncode == -signal.SIGKILL, f"training had already finished {where}"
    _every_file_loads(root)

    resumed = run_lorafit(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = lora_file(root)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), f"resumed LoRA differs {where}"
    assert _every_file_loads(root) == 2 * 9  # epochs 1-8 and the final file, kohya + diffusers
    assert not [p for p in root.rglob(".*") if p.is_file() or p.is_dir()], "temporary files left behind"


def test_sigusr1_saves_at_a_step_boundary_requeues_and_resumes_exactly(reference, tiny_models, demo_data, tmp_path):
    """The requeue path without a cluster: a stand-in scontrol records the call."""
    expected, _ = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    root = tmp_path / "run"
    args = demo_fit_args(tiny_models["sd1"], demo_data, root, *RUN_ARGS)
    # SLURM_JOB_ID alone names the job to requeue; without SLURM_NTASKS Lightning does not think it runs under srun.
    process = _start(args, SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    _wait_for(root / "lora" / "ohwx-star-epoch-002.safetensors", process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    checkpoint = root / "hpc_ckpt_1.ckpt"
    assert checkpoint.is_file() and "requeued SLURM job 4242" in stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert not (root / "lora" / "ohwx-star.safetensors").exists(), "a requeued run must not write the final LoRA"
    epoch = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 2 <= epoch < 8  # saved mid-run, after the signal

    resumed = run_lorafit(*args, "--ckpt_path", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = lora_file(root)
    assert all(torch.equal(got[k], expected[k]) for k in expected), "resumed LoRA differs"
    assert _every_file_loads(root) == 2 * 9  # no epoch's export lost across the requeue


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_says_so_exits_143_and_resumes_exactly(reference, tiny_models, demo_data, tmp_path):
    """kill, scancel, docker stop, a job manager: a resumable checkpoint and a status that is not success.

    The signal goes to the whole process group, data-loading worker included, as scancel sends it.
    """
    expected, _ = reference
    root = tmp_path / "run"
    args = demo_fit_args(tiny_models["sd1"], demo_data, root, *RUN_ARGS, "--data.num_workers", "1")
    process = _start(args)
    _wait_for(root / "lora" / "ohwx-star-epoch-002.safetensors", process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 143, stderr[-3000:]
    checkpoint = root / "hpc_ckpt_1.ckpt"
    assert checkpoint.is_file(), stderr[-3000:]
    assert (
        f"SIGTERM: saved {checkpoint}; stopping with exit status 143 (resume with --ckpt_path {checkpoint})" in stderr
    )
    assert not (root / "lora" / "ohwx-star.safetensors").exists(), "a stopped run must not write the final LoRA"
    assert not (root / ".lorafit.lock").exists()  # the run folder is free again
    assert 2 <= torch.load(checkpoint, weights_only=False)["epoch"] < 8

    resumed = run_lorafit(*args, "--ckpt_path", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = lora_file(root)
    assert all(torch.equal(got[k], expected[k]) for k in expected), "resumed LoRA differs"


_DYING_WRITER = """
import os, signal, sys, torch
import safetensors.torch
from lorafit.io.atomic import atomic_torch_save
from lorafit.networks import files
from lorafit.networks.lora_weights import LoraModuleWeights

writer, target = sys.argv[1], sys.argv[2]

def write(version):
    if writer == "checkpoint":
        atomic_torch_save({"version": version}, target)
        return
    weights = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModuleWeights(
        torch.full((4, 32), float(version)), torch.full((32, 4), float(version)), 4.0)}}
    if writer == "kohya":
        files.save_kohya(target, "sd1", weights)
    else:
        files.save_diffusers(target, "sd1", weights)

def half_written_then_killed(real):
    # Write the file for real, cut it to half its size, and die: a kill -9 in mid-write.
    def write_file(obj, destination, *args, **kwargs):
        real(obj, destination, *args, **kwargs)
        if hasattr(destination, "write"):
            destination.flush()
            destination.truncate(destination.tell() // 2)
        else:
            os.truncate(destination, os.path.getsize(destination) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return write_file

write(1)
torch.save = half_written_then_killed(torch.save)
files.save_file = safetensors.torch.save_file = half_written_then_killed(safetensors.torch.save_file)
write(2)
"""


@pytest.mark.parametrize("writer", ["checkpoint", "kohya", "diffusers"])
def test_kill_9_in_the_middle_of_a_write_leaves_the_previous_file(writer, tmp_path):
    """A child writes version 1, then dies by SIGKILL with half of version 2 written.

    A random kill rarely lands inside the few milliseconds a small file takes to write, so the
    child kills itself exactly there. The target must still be the whole version 1.
    """
    target = tmp_path / ("last.ckpt" if writer == "checkpoint" else "lora.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", _DYING_WRITER, writer, str(target)],
        env=lorafit_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    if writer == "checkpoint":
        assert torch.load(target, weights_only=False) == {"version": 1}
    else:
        tensors = load_file(str(target))
        assert tensors and all(t.float().abs().max().item() in (1.0, 4.0) for t in tensors.values())  # 4.0: alpha
    # Beside it only the hidden temporary of the interrupted write, never a visible partial file.
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [target.name]


def test_checkpoints_carry_the_global_rng_state_and_load_weights_only(tiny_models, tmp_path):
    """Anything drawing from the global generators (dropout, augmentation) continues as if never stopped."""
    import random as python_random

    import numpy as np

    from lorafit.training.module import LoraDiffusionModule

    module = LoraDiffusionModule(model=tiny_models["sd1"], rank=4)
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    torch.manual_seed(7), np.random.seed(7), python_random.seed(7)
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "x.ckpt")
    expected = (torch.rand(3), np.random.rand(3), python_random.random())

    torch.manual_seed(8), np.random.seed(8), python_random.seed(8)
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)  # no pickled NumPy objects inside
    module.on_load_checkpoint(loaded)
    got = (torch.rand(3), np.random.rand(3), python_random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.slow
def test_sigusr1_outside_slurm_saves_and_exits_138_not_success(tiny_models, demo_data, tmp_path):
    """Nothing requeues the run, so its stop must not read as a finished run (status 0) to a job manager."""
    root = tmp_path / "run"
    process = _start(
        demo_fit_args(tiny_models["sd1"], demo_data, root, *RUN_ARGS), SLURM_JOB_ID="", SLURM_ARRAY_JOB_ID=""
    )
    _wait_for(root / "lora" / "ohwx-star-epoch-001.safetensors", process)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGUSR1 == 138, stderr[-3000:]
    checkpoint = root / "hpc_ckpt_1.ckpt"
    assert checkpoint.is_file()
    assert f"saved {checkpoint}; stopping with exit status 138 (resume with --ckpt_path {checkpoint})" in stderr
