"""Count what in a training step would make the host wait for the GPU, on any machine.

On a GPU the host queues kernels ahead of the device, and a step keeps the device busy only while
the host stays ahead. These tensor operations make the host wait until everything queued so far
has run (a *host sync*), and the device then idles while the host queues the next kernels:

- reading a device value on the host: ``.item()``, ``float(t)``, ``bool(t)`` (every ``if t:``),
  ``int(t)``, ``.tolist()``, ``.numpy()``, printing a tensor, a blocking ``.cpu()``/``.to("cpu")``;
- making a tensor from host numbers straight on the device: ``torch.tensor(x, device=...)``
  (``as_tensor``, ``new_tensor``) copies from pageable memory with a blocking copy. Lightning's
  ``self.log(name, float)`` does exactly this;
- operations whose output size depends on the values, which the host must know to allocate it:
  ``nonzero``, ``masked_select``, ``unique``, indexing with a boolean mask, one-argument ``where``,
  ``repeat_interleave`` with tensor repeats;
- ``torch.distributed.barrier()``, which with NCCL waits for the GPU (Lightning's
  ``strategy.reduce`` and ``self.log(..., sync_dist=True)`` call it before each all-reduce).

A CPU has nothing to wait for, but the same calls happen in the same places. To count them on a
CPU the counter tracks which tensors *would* be on the device: the module's parameters and
buffers, the batch, tensors made with an explicit ``device=``, and everything computed from
those. Host tensors (PyTorch's optimizer step counters, values logged from host numbers, the host
copies of :mod:`lorafit.distributed.host_readback`) are read freely, as they would be on a GPU. The benchmark
reports the count for lorafit's step and for the reference loop, and a test keeps lorafit's step
at zero. (On a real GPU, ``torch.cuda.set_sync_debug_mode("warn")`` gives the same answer.)
"""

from __future__ import annotations

import collections
import json
import traceback
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

READS = frozenset(
    {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "__format__", "__repr__", "__str__"}
)
UPLOADS = frozenset({"tensor", "as_tensor", "new_tensor"})
SIZE_FROM_VALUES = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"})
_LORAFIT_ROOT = str(Path(__file__).resolve().parents[1])


def _site(stack: list) -> str:
    """``file:line function`` of the innermost caller outside torch (where the sync was asked for)."""
    for frame in reversed(stack[:-1]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "torch internals"


class HostSyncCounter(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records every would-be host sync (see module docstring) by call site.

    Args:
        device: The training device (``device=`` factories on it make device tensors).
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.sites: collections.Counter = collections.Counter()
        self._on_device: set[int] = set()

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def mark_on_device(self, *trees: Any) -> None:
        """Treat the tensors in ``trees`` (modules' tensors, batches: any nesting) as device tensors."""
        for leaf in tree_leaves(list(trees)):
            if isinstance(leaf, torch.nn.Module):
                self.mark_on_device(list(leaf.parameters()), list(leaf.buffers()))
            elif isinstance(leaf, torch.Tensor) and id(leaf) not in self._on_device:
                self._on_device.add(id(leaf))
                weakref.finalize(leaf, self._on_device.discard, id(leaf))

    def is_on_device(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._on_device

    def _to_host(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether the call copies to the host: ``.cpu()``, ``.to("cpu")``, or ``.to(device)`` of another
        type than the training device's (on a CPU run, ``.to(module.device)`` stays on the "device")."""
        if name == "cpu":
            return True
        if name != "to":
            return False
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if isinstance(target, str):
            return torch.device(target).type == "cpu"
        return target is not None and target.type == "cpu" != self.device.type

    def __enter__(self):
        # barrier is no tensor operation, so no TorchFunctionMode sees it: wrap it while counting.
        self._barrier = torch.distributed.barrier

        def counted_barrier(*args, **kwargs):
            self._record("barrier")
            return self._barrier(*args, **kwargs)

        torch.distributed.barrier = counted_barrier
        return super().__enter__()

    def __exit__(self, *exc):
        torch.distributed.barrier = self._barrier
        return super().__exit__(*exc)

    def _record(self, name: str) -> None:
        self.sites[f"{name} at {_site(traceback.extract_stack())}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(self.is_on_device(t) for t in inputs)
        explicit = kwargs.get("device")
        if name == "to" and explicit is None:
            explicit = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        on_device = explicit is not None and torch.device(explicit).type == self.device.type
        if (
            (from_device and (name in READS or (self._to_host(name, args, kwargs) and not kwargs.get("non_blocking"))))
            or (name in UPLOADS and (on_device or (name == "new_tensor" and from_device)))
            or (from_device and _size_from_values(name, args, kwargs))
        ):
            self._record(name)
        result = func(*args, **kwargs)
        if name.endswith("_") or "out" in kwargs or self._to_host(name, args, kwargs):
            return result  # in place / into a given tensor / to the host: the result's place is unchanged
        if from_device or on_device:
            self.mark_on_device(result)
        return result


def _size_from_values(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the output's size depends on tensor values (see module docstring)."""
    if name in SIZE_FROM_VALUES:
        return True
    if name == "where":
        return len(args) + len(kwargs) == 1
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__") and len(args) > 1:
        return any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool and index.dim() > 0
            for index in tree_leaves(args[1])
        )
    return False


class CountHostSyncs(pl.Callback):
    """Count host syncs from the start of optimizer step ``first`` to the start of step ``last``.

    The window covers whole steps back to back: the step, the optimizer, every callback, the
    progress bar and logging. ``per_step`` is the mean over the window. With ``output``, each rank
    writes ``{"per_step", "sites"}`` to ``<output>.rank<N>.json`` when training ends (for runs in
    other processes: ``--trainer.callbacks+=`` on the command line).
    """

    def __init__(self, first: int = 2, last: int = 5, output: str | None = None):
        self.first, self.last = first, last
        self.output = output
        self.counter: HostSyncCounter | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # lorafit's NaN/Inf guard reads each loss at once in a CPU process (nothing waits there) and a
        # step late on a GPU: count what a GPU run does (lorafit/training/nonfinite.py).
        guard = getattr(pl_module, "nonfinite", None)
        if guard is not None and guard.defer is None:
            guard.defer = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self.counter is None:
            self.counter = HostSyncCounter(pl_module.device)
            self.counter.mark_on_device(pl_module, *optimizer_state_on_device(trainer.optimizers))
            self.counter.__enter__()
        elif trainer.global_step == self.last and self._counting:
            self.counter.__exit__(None, None, None)
        if self._counting:
            self.counter.mark_on_device(batch)

    @property
    def _counting(self) -> bool:
        return self.counter is not None and self.counter in torch.overrides._get_current_function_mode_stack()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._counting:
            self.counter.__exit__(None, None, None)
            raise RuntimeError(f"CountHostSyncs: training ended before step {self.last}; set max_steps above it")
        if self.output:  # one file per rank: <output>.rank<N>.json
            path = Path(f"{self.output}.rank{trainer.global_rank}.json")
            path.write_text(json.dumps({"per_step": self.per_step, "sites": dict(self.counter.sites)}, indent=1))

    @property
    def per_step(self) -> float:
        return self.counter.count / (self.last - self.first) if self.counter is not None else float("nan")

    def lorafit_sites(self) -> dict[str, int]:
        """The sites inside the lorafit package (what lorafit itself asks for)."""
        return {site: n for site, n in (self.counter.sites if self.counter else {}).items() if _LORAFIT_ROOT in site}


def optimizer_state_on_device(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Optimizer state that lives with the parameters (moments); PyTorch keeps step counters on the
    host unless the optimizer is fused or capturable, and then they follow the parameters too."""
    tensors = []
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors.extend(
                v
                for k, v in state.items()
                if isinstance(v, torch.Tensor) and (k != "step" or v.device.type != "cpu" or v.dim() > 0)
            )
    return tensors
