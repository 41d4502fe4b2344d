"""One live run per run folder: a lock file held for the run's lifetime.

Two ``lorafit fit`` runs writing into one ``trainer.default_root_dir`` mix their files: the
second's ``config.yaml`` beside the first's ``last.ckpt`` and final LoRA (rank 4 and rank 8 in one
folder), and a resume then trains on whichever checkpoint came last. So rank 0 of every run holds
``<run folder>/.lorafit.lock`` from before it writes anything until it exits, and a second run is
refused with one line naming the holder.

The lock is a kernel lock (``flock``) on that file. The kernel releases it when the holder's
process ends in any way, ``kill -9`` and a node reboot included, so a lock left by a dead run is
never mistaken for a live one: the next run takes it over (and says so). The file records the
holder's pid, host, SLURM job and command, for the refusal message. On a filesystem without
``flock`` (some network mounts), the record decides instead: a holder on this host whose pid is no
longer running is stale; one on another host is treated as live unless it is this same SLURM job
(a requeued job restarting on another node), since its pid cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.lock")

LOCK_NAME = ".lorafit.lock"
# Environment variables that name a process's rank under the launchers lorafit is started by
# (Lightning's subprocess launcher, srun, torchrun, MPI): only the process with rank 0 in all takes the lock.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def is_launching_process() -> bool:
    """Whether this process is rank 0 of its run, judged before any process group exists."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def _describe(holder: dict) -> str:
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"SLURM job {holder['slurm_job']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunFolderLock:
    """The lock of one run folder (see the module docstring); a context manager.

    Args:
        folder: The run folder (``trainer.default_root_dir``); created if missing.
        key: The config key that names the folder, for messages.
    """

    def __init__(self, folder: str | os.PathLike, key: str = "trainer.default_root_dir") -> None:
        self.folder = Path(folder)
        self.key = key
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def _unwritable(self, error: OSError) -> LorafitError:
        reason = error.strerror or type(error).__name__
        return LorafitError(f"cannot write in the run folder {self.folder} ({reason}); choose a writable --{self.key}")

    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }

    def _read_holder(self, fd: int) -> dict:
        with contextlib.suppress(OSError, ValueError):
            os.lseek(fd, 0, os.SEEK_SET)
            holder = json.loads(os.read(fd, 65536).decode() or "{}")
            if isinstance(holder, dict):
                return holder
        return {}

    def _refuse(self, holder: dict) -> LorafitError:
        return LorafitError(
            f"run folder {self.folder} is in use by another lorafit run ({_describe(holder)}); wait for it to "
            f"end or choose another --{self.key} (two runs in one folder mix their checkpoints and LoRA files)"
        )

    def _stale_without_flock(self, holder: dict) -> bool:
        if not holder:
            return True
        mine = self._record()
        if holder.get("slurm_job") and holder.get("slurm_job") == mine["slurm_job"]:
            return True  # this job, requeued: its earlier incarnation is gone
        if holder.get("host") != mine["host"]:
            return False
        return not _pid_running(int(holder.get("pid", 0)))

    def acquire(self) -> RunFolderLock:
        """Takes the lock, or raises a one-line :class:`LorafitError` (held by a live run, folder not writable)."""
        try:
            self._created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._unwritable(error) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise self._unwritable(error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                kernel_lock = True
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise self._unwritable(error) from None
                kernel_lock = False
            # The file may have been removed by its last holder between our open and our lock:
            # then we hold a lock on a name-less file, and must start again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = self._read_holder(fd)
        if not kernel_lock and not self._stale_without_flock(holder):
            os.close(fd)
            raise self._refuse(holder)
        if holder:
            logger.info("taking over the lock of a run that ended without releasing it (%s)", _describe(holder))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(self._record()) + "\n").encode())
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            raise self._unwritable(error) from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file and releases the lock (a no-op when not held). A run folder this lock
        created and nothing else wrote into (a run refused by a later check) is removed too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # fails, as it should, unless the folder is empty

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
