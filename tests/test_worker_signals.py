"""DataLoader workers survive a SIGTERM sent to the whole job (scancel), and end when their training process
says so."""

from __future__ import annotations

import multiprocessing
import subprocess
import time

from lorafit.data.worker_signals import sigterm_from_parent_only


def _worker(ready) -> None:
    sigterm_from_parent_only(0)
    ready.set()
    time.sleep(600)


def test_sigterm_from_outside_is_dropped_and_from_the_parent_obeyed():
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(60)
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process: scancel's case
        time.sleep(1)
        assert worker.is_alive(), "a SIGTERM from outside killed the worker"
        worker.terminate()  # the DataLoader's own shutdown, and multiprocessing's at exit
        worker.join(30)
        assert not worker.is_alive(), "the worker ignored its training process"
        assert worker.exitcode == 143
    finally:
        if worker.is_alive():
            worker.kill()
