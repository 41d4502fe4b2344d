"""The run-folder lock: one live run per folder, stale locks of dead runs taken over, one-line refusals."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from cli_runs import lorafit_env

import lorafit.io.run_lock as run_lock
from lorafit.errors import LorafitError
from lorafit.io.run_lock import LOCK_NAME, RunFolderLock, is_launching_process


def test_a_second_lock_on_a_live_run_folder_is_refused_naming_the_holder(tmp_path):
    with RunFolderLock(tmp_path / "run"):
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LorafitError) as err:
            RunFolderLock(tmp_path / "run").acquire()
        message = str(err.value)
        assert message.startswith(f"run folder {tmp_path / 'run'} is in use by another lorafit run (pid {os.getpid()}")
        assert "--trainer.default_root_dir" in message and "\n" not in message
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released: the file is gone
    RunFolderLock(tmp_path / "run").acquire().release()


_HOLDER = """
import sys, time
from lorafit.io.run_lock import RunFolderLock
RunFolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(folder) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], env=lorafit_env(), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_the_lock_of_a_run_killed_with_kill_9_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(LorafitError, match=f"pid {holder.pid} on"):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the dead run
    with caplog.at_level(logging.INFO, logger="lorafit.lock"), RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid}" in caplog.text


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(LorafitError) as err:
        RunFolderLock(tmp_path / "file" / "run").acquire()
    assert str(err.value) == (
        f"cannot write in the run folder {tmp_path / 'file' / 'run'} (Not a directory); "
        "choose a writable --trainer.default_root_dir"
    )


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (some network mounts): the lock file's record decides."""

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", unsupported)


def _record(folder, **fields) -> None:
    folder.mkdir(exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "slurm_job": None, **fields}))


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path, no_flock):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _record(tmp_path, pid=dead.pid)
    RunFolderLock(tmp_path).acquire().release()


def test_without_flock_a_live_pid_or_another_host_is_refused_unless_it_is_this_slurm_job(
    tmp_path, no_flock, monkeypatch
):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _record(tmp_path, pid=sleeper.pid)
        with pytest.raises(LorafitError, match=f"pid {sleeper.pid} on"):
            RunFolderLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    _record(tmp_path, pid=1, host="some-other-node", slurm_job="77")
    with pytest.raises(LorafitError, match="pid 1 on some-other-node, SLURM job 77"):
        RunFolderLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto this node
    RunFolderLock(tmp_path).acquire().release()


@pytest.mark.parametrize(
    "environment,launching",
    [
        ({}, True),
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's subprocess launcher, second GPU
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # first GPU of the second node
        ({"SLURM_PROCID": "3"}, False),
        ({"RANK": "2"}, False),  # torchrun
    ],
)
def test_only_rank_zero_takes_the_lock(monkeypatch, environment, launching):
    for name in run_lock._RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert is_launching_process() is launching
