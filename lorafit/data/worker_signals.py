"""SIGTERM in DataLoader workers: ignored when it comes from outside, obeyed from the training process.

``scancel`` (and ``kill -- -PGID``) sends SIGTERM to every process of the job step, data-loading
workers included. A worker killed by it makes torch raise "DataLoader worker is killed by signal"
in the middle of a training step, before lorafit's requeue callback could save the checkpoint it
saves on SIGTERM (lorafit/callbacks/requeue.py). Ignoring SIGTERM outright is wrong too: the
training process itself ends its workers with SIGTERM (``DataLoader`` shutdown, and
``multiprocessing``'s exit handler, which then waits for them), so a worker deaf to it hangs the
exit of a run that stops on an error.

So each worker blocks SIGTERM and a small thread takes it with ``sigwaitinfo``, which says who sent
it: from the parent (the training process) the worker exits at once, from anyone else the signal is
dropped; the training process saves, exits and takes its workers with it (a worker whose parent is
gone also exits by itself, torch's watchdog).
"""

from __future__ import annotations

import os
import signal
import threading


def _obey(senders: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in senders:
            os._exit(128 + signal.SIGTERM)  # what dying by the signal reports; no cleanup is owed here


def sigterm_from_parent_only(worker_id: int, training_process: int | None = None) -> None:
    """A DataLoader ``worker_init_fn`` (see the module docstring); Linux/macOS (``sigwaitinfo``).

    Args:
        worker_id: The worker's number (unused; the DataLoader passes it).
        training_process: The pid of the process that owns the DataLoader. With the ``spawn`` and
            ``forkserver`` start methods it is not the worker's parent; bind it with
            ``functools.partial`` where the DataLoader is made.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return  # other platforms keep the default: the worker dies with the signal
    senders = {os.getppid()} | ({training_process} if training_process else set())
    # Blocked before any other thread of the worker exists: threads inherit the mask, so the signal
    # stays pending until the waiting thread takes it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey, args=(senders,), name="sigterm", daemon=True).start()
