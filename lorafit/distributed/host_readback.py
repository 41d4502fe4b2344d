"""Read small device values on the host one step late, so reading them never stalls the GPU.

``loss.item()`` in a training step waits until every kernel queued so far has run; the GPU then
idles while the host queues the next step (see lorafit/bench/host_syncs.py, which counts such
waits). Here each value is copied into pinned host memory with a non-blocking copy and a CUDA
event is recorded after it; the host reads it a step later, waiting (if at all) only for that
event, while the GPU still has the newer step queued. On a CPU the copy is immediate and the same
code runs.
"""

from __future__ import annotations

import collections
from typing import Any

import torch


class _Copy:
    """One value on its way to the host: the host buffer, the event after its copy, the caller's payload."""

    def __init__(self, value: torch.Tensor, payload: Any):
        value = value.detach()
        pinned = value.device.type == "cuda"
        self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
        self.host.copy_(value, non_blocking=pinned)
        self.event: torch.cuda.Event | None = None
        if pinned:
            self.event = torch.cuda.Event()
            self.event.record()
        self.payload = payload

    def wait(self) -> tuple[list[float], Any]:
        if self.event is not None:
            self.event.synchronize()  # waits for this copy only, not for the work queued after it
        return self.host.flatten().tolist(), self.payload


class HostReadback:
    """A queue of device values read on the host later (see module docstring).

    ``push`` a value (and anything that says where it came from) each step; ``collect(keep=1)``
    returns every value but the newest, as ``(list of floats, payload)`` pairs, oldest first.
    """

    def __init__(self):
        self._pending: collections.deque[_Copy] = collections.deque()

    def push(self, value: torch.Tensor, payload: Any = None) -> None:
        self._pending.append(_Copy(value, payload))

    def collect(self, keep: int = 0) -> list[tuple[list[float], Any]]:
        """The values pushed before the newest ``keep`` ones (``keep=0``: all, waiting for each)."""
        ready = []
        while len(self._pending) > keep:
            ready.append(self._pending.popleft().wait())
        return ready

    def clear(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)
