"""On a real (local, one-node) SLURM cluster: the sbatch template trains with 2 DDP tasks, and a job
that gets SIGUSR1 mid-run is requeued, resumes from its HPC checkpoint and ends with the same LoRA.

The cluster comes from tools/local_slurm.sh (slurm-wlm + munge, installed with apt-get when
missing; needs root) and is stopped again, by pid, at the end. When SLURM is not installed the
test is not run, unless LORAFIT_SLURM_TESTS=1 demands it (CI), in which case a cluster that cannot
be started is a failure.

Both jobs train the tiny SD1 model on the CPU with 2 tasks (gloo DDP): 4 images, 2 per task, so
one optimizer step per epoch, which keeps the jobs short. The requeued job's final LoRA must be
bitwise equal to the uninterrupted job's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_runs import DEMO_CONFIG, REPO, lorafit_command, lorafit_env
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocesses: DDP ranks, SLURM jobs, a browser, killed trainings

LOCAL_SLURM = REPO / "tools" / "local_slurm.sh"
SLURM_DIR = Path(os.environ.get("LORAFIT_SLURM_DIR", "/tmp/lorafit-slurm"))
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")


@pytest.fixture(scope="module")
def slurm_env():
    requested = os.environ.get("LORAFIT_SLURM_TESTS") == "1"
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    if not requested and not all(shutil.which(tool, path=search) for tool in DAEMONS):
        pytest.skip(
            "SLURM is not installed (set LORAFIT_SLURM_TESTS=1 to install slurm-wlm + munge and run "
            "this test on a local cluster: tools/local_slurm.sh)"
        )
    status = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True)
    was_running = "slurmctld running" in status.stdout
    up = subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode:
        pytest.fail(f"could not start a local SLURM cluster with tools/local_slurm.sh up: {up.stderr[-2000:]}")
    env = {"SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    try:
        yield env
    finally:
        if not was_running:
            down = subprocess.run(["bash", str(LOCAL_SLURM), "down"], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr
            left = subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True, text=True).stdout
            assert "running" not in left, left


def _job_env(cluster: dict, runs: Path) -> dict:
    # The job inherits this environment (sbatch --export=ALL): this checkout's lorafit, offline.
    return lorafit_env(**cluster, LORAFIT_RUNS=str(runs), LORAFIT_COMMAND=" ".join(lorafit_command()))


def _job(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job: str, env: dict, until, what: str, timeout: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job, env)
        if until(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job} {info['JobState']} while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"job {job}: no {what} within {timeout}s (state {_job(job, env).get('JobState')})")


def _fit_args(tiny_models, demo_data) -> list[str]:
    return [
        "--model.model",
        tiny_models["sd1"],
        "--data.train_dir",
        demo_data,
        "--data.repeats",
        "1",
        "--data.batch_size",
        "2",
        "--trainer.max_epochs",
        "12",
        "--model.train_text_encoder",
        "false",
        "--trainer.accelerator",
        "cpu",
    ]


def test_sbatch_template_with_2_tasks_and_a_requeued_job_ending_with_the_same_lora(
    slurm_env, tiny_models, demo_data, tmp_path
):
    runs = tmp_path / "runs"
    runs.mkdir()
    env = _job_env(slurm_env, runs)
    fit_args = _fit_args(tiny_models, demo_data)

    # 1. The template as a user submits it, sized for this CPU node: 2 tasks, no GPU.
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            f"--output={runs}/slurm-%x-%j.out",
            "slurm/train_single_node.sbatch",
            str(DEMO_CONFIG),
            *fit_args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    info = _wait(job, env, lambda i: i.get("JobState") == "COMPLETED", "completion")
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    straight = runs / f"lorafit-{job}"
    log = (runs / f"slurm-lorafit-{job}.out").read_text()
    assert log.count("lorafit.models: loaded") == 2, log[-3000:]  # two ranks
    assert log.count("saved LoRA") == 2 * 13, log[-3000:]  # written once each: 12 epochs + final, 2 formats
    assert (straight / "checkpoints" / "last.ckpt").is_file()
    expected = load_file(str(straight / "lora" / "ohwx-star.safetensors"))

    # 2. Through `lorafit submit`, then SIGUSR1 to the training tasks mid-run (what
    #    `#SBATCH --signal=SIGUSR1@90` does 90 s before the time limit).
    submitted = subprocess.run(
        lorafit_command(
            "submit",
            "--config",
            str(DEMO_CONFIG),
            "--cpu",
            "--ntasks_per_node",
            "2",
            "--cpus_per_task",
            "1",
            "--job_name",
            "requeued",
            "--runs_dir",
            str(runs),
            "--",
            *fit_args,
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    run_dir = runs / f"requeued-{job}"
    deadline = time.monotonic() + 900
    while not (run_dir / "lora" / "ohwx-star-epoch-002.safetensors").exists():
        assert time.monotonic() < deadline and _job(job, env).get("JobState") in ("PENDING", "RUNNING"), (
            "job 2 did not reach epoch 2"
        )
        time.sleep(0.2)
    signalled = subprocess.run(["scancel", "--signal=USR1", job], env=env, capture_output=True, text=True)
    assert signalled.returncode == 0, signalled.stderr

    requeued = _wait(
        job,
        env,
        lambda i: i.get("Restarts") == "1" and i.get("JobState") in ("PENDING", "RUNNING", "COMPLETED"),
        "requeue",
    )
    # A requeued job waits ~2 minutes before it may start again (SLURM sets its BeginTime); let it
    # start now to keep the test short. Real clusters just wait.
    if requeued["JobState"] == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    info = _wait(job, env, lambda i: i.get("JobState") == "COMPLETED", "completion after the requeue")
    assert info["Restarts"] == "1"

    log = (runs / f"slurm-requeued-{job}.out").read_text()  # --open-mode=append: both runs' output
    assert "restart 0" in log and "restart 1" in log
    assert f"requeued SLURM job {job}" in log
    assert f"resuming from {run_dir}/hpc_ckpt_1.ckpt" in log, log[-3000:]
    checkpoint = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)
    assert 2 <= checkpoint["epoch"] < 12  # taken mid-run
    got = load_file(str(run_dir / "lora" / "ohwx-star.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "requeued job's LoRA differs"
    files = sorted(run_dir.rglob("*.safetensors"))
    assert len(files) == 2 * 13, files  # no epoch's export lost across the requeue
    for path in files:
        assert load_file(str(path))
    # The TensorBoard run of the job continues in one directory (Lightning names it by the job id).
    assert [p.name for p in (run_dir / "lightning_logs").iterdir()] == [f"version_{job}"]
