"""Estimate the peak GPU memory of lorafit's training step at full size, on any machine (a developer tool).

The step is lorafit's own (``BenchLoraModule`` = ``LoraDiffusionModule`` on the published
architecture): LoRA attached by ``configure_model``, ``denoising_loss`` on a synthetic batch, the
backward pass and the optimizer from ``configure_optimizers``, run ``steps`` times so the
optimizer state exists. It runs on fake tensors (``FakeTensorMode``: shapes, dtypes and storage
sizes, no data), so full-size SDXL takes a minute of CPU and no memory, under PyTorch's
``MemTracker``, which counts every tensor storage alive at each op, by kind: parameters, buffers,
gradients, activations (forward outputs kept for backward), temporaries (backward-pass tensors:
activation gradients, recomputed checkpoints), optimizer state and the batch.

What makes the count a GPU's rather than a CPU's:

- attention keeps no [L, L] score matrix: PyTorch's CPU dispatch runs its flash kernel for the
  UNets' attention (no mask, no dropout), which keeps what CUDA's flash kernel keeps; a stand-in
  that allocated exactly CUDA's flash tensors changed no estimate by a byte (benchmarks/memory.md)
  and was dropped. ``sdpa=math`` forces the math form, as it would on a GPU;
- autocast follows CUDA's op lists (:mod:`devbench.cuda_autocast`: norms, softmax and
  upsampling in float32);
- torch's plain AdamW runs its ``foreach`` implementation, CUDA's default (on a CPU it would
  loop over the parameters, with other temporaries);
- the order is Lightning's: forward, ``zero_grad``, backward, optimizer step, so the previous
  step's gradients are alive during the forward pass, as in ``lorafit fit``.

:func:`measure_step_memory` runs the same code on real CPU tensors (small sizes): the test
compares the two, which checks that the fake-tensor count is the count of the real step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.nn.attention import SDPBackend, sdpa_kernel

from devbench.cuda_autocast import cuda_autocast_policy
from devbench.nf4_state import dequant_transient_bytes, expose_quant_state, fake_params4bit, is_nf4, logical_params
from lorafit.bench.architectures import synthetic_batch
from lorafit.bench.module import BenchLoraModule
from lorafit.bench.settings import BenchSetting
from lorafit.errors import LorafitError

# MemTracker's kinds -> the names of the report.
KINDS = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OPT: "optimizer_state",
    _MemRefType.OTH: "batch",
}


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


class LoraMemTracker(MemTracker):
    """``MemTracker`` for a model with frozen weights, keeping the whole step's peak only.

    Two changes to torch 2.13's tracker: it hooks the gradient of every parameter of each module
    it sees, and ``register_hook`` refuses parameters that need no gradient (every frozen base
    weight), so those get a no-op handle; and after every op it walks all tracked modules to update
    per-module peaks, which is quadratic (hours for the UNet's thousands of modules), so only the
    global peak and its breakdown are kept.
    """

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        if install_grad_hooks:
            for param in module.parameters():
                if not param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (_NO_HOOK, _NO_HOOK)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def estimate_step_memory(setting: BenchSetting, steps: int = 2) -> dict:
    """Peak memory of ``steps`` training steps of ``setting`` on fake tensors (see module docstring).

    ``steps=0`` counts the loaded model only (weights, LoRA, the batch), without a step.
    Returns ``peak_bytes``, ``breakdown`` (bytes by kind at the peak), ``resident_bytes`` (what
    stays between steps: weights, gradients, optimizer state, batch), the frozen and the LoRA
    parameter counts, and notes on what the setting asks for that the estimate does not model.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return _tracked_steps(setting, steps, fake=mode)


def measure_step_memory(setting: BenchSetting, steps: int = 2) -> dict:
    """The same count as :func:`estimate_step_memory`, on real CPU tensors (for small settings)."""
    return _tracked_steps(setting, steps, fake=None)


def build_estimate_module(
    setting: BenchSetting, fake: FakeTensorMode | None = None
) -> tuple[BenchLoraModule, list[str]]:
    """lorafit's module for ``setting``, LoRA attached, in training mode; and what is not modelled.

    With ``fake``, the module is built on ``meta`` (as the FLOP count is) and its tensors then
    become fake CPU tensors of ``fake``: PEFT moves each new adapter with ``.to()``, which cannot
    swap a parameter created under ``FakeTensorMode``, so nothing is built under it.
    """
    # fake tensors cannot be compiled; fusion would only lower the peak
    kwargs = dataclasses.replace(setting, compile=False).module_kwargs()
    notes = ["compile not modelled (eager step)"] if setting.compile else []
    if setting.optimizer == "adamw":
        optimizer = kwargs["optimizer"]
        optimizer["args"] = {**optimizer["args"], "foreach": True}  # CUDA's default (see docstring)
    if setting.sdpa in ("efficient", "cudnn"):
        notes.append(f"sdpa={setting.sdpa} counted as flash (the same O(L) tensors)")
    module = BenchLoraModule(
        setting.family,
        setting.width_divisor,
        build_device="meta" if fake else "cpu",
        with_vae=setting.latents == "vae",
        **kwargs,
    )
    with _outside(fake):
        module.configure_model()
    if fake:
        _to_fake(module, fake)
    expose_quant_state(module)
    return module.train(), notes  # Trainer.fit trains the whole module; diffusers checkpoints only in train mode


@contextlib.contextmanager
def _outside(mode: FakeTensorMode | None):
    """Leave ``mode`` for the duration (a no-op without one)."""
    if mode is None:
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def _to_fake(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every meta parameter and buffer of ``module`` by a fake CPU tensor of the same layout."""

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        return mode.fake_tensor_converter.from_meta_and_device(mode, tensor, torch.device("cpu"))

    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None and is_nf4(param):
                submodule._parameters[name] = fake_params4bit(param, fake)
            elif param is not None:
                submodule._parameters[name] = torch.nn.Parameter(fake(param.data), requires_grad=param.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = fake(buffer)


def _optimizer(module: BenchLoraModule, fake: FakeTensorMode | None) -> torch.optim.Optimizer:
    # configure_optimizers reads the run length for its schedule from the trainer, and nothing else.
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=1000)
    try:
        # bitsandbytes computes its quantisation maps from real values in __init__ (.tolist()), so
        # the optimizer is built outside the fake mode; its state is made in step(), inside it.
        with _outside(fake):
            configured = module.configure_optimizers()
    finally:
        module._trainer = None
    return configured["optimizer"] if isinstance(configured, dict) else configured


def _snapshot(tracker: MemTracker, kind: str = "current") -> dict[str, int]:
    totals = dict.fromkeys(KINDS.values(), 0)
    for device_snapshot in tracker.get_tracker_snapshot(kind).values():
        for key, value in device_snapshot.items():
            if key in KINDS:
                totals[KINDS[key]] += value
    return totals


def _tracked_steps(setting: BenchSetting, steps: int, fake: FakeTensorMode | None) -> dict:
    if steps < 0:
        raise LorafitError(f"memory estimate: steps must be >= 0, got {steps}")
    started = time.perf_counter()
    module, notes = build_estimate_module(setting, fake)
    optimizer = _optimizer(module, fake)
    batch = synthetic_batch(
        setting.family,
        setting.resolution,
        setting.batch_size,
        setting.width_divisor,
        setting.latents == "cached",
        generator=torch.Generator().manual_seed(0),
        text_tokens=setting.text_tokens,
    )
    autocast = setting.precision != "fp32"
    tracker = LoraMemTracker()
    tracker.track_external(module, *[value for value in batch.values() if isinstance(value, torch.Tensor)])
    with contextlib.ExitStack() as stack:
        # sdpa=math keeps the attention matrix on a GPU too: then SDPA runs its math form here as well.
        if setting.sdpa == "math":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if autocast:
            stack.enter_context(cuda_autocast_policy())
        stack.enter_context(tracker)
        for step in range(steps):
            if step:
                tracker.reset_mod_stats()  # MemTracker refuses a second forward of the same root module otherwise
            # Lightning's automatic optimisation (Closure): training_step under autocast, zero_grad,
            # backward, optimizer.step; the gradients of one step live until the next step's zero_grad.
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = module.denoising_loss(batch, torch.Generator().manual_seed(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            del loss
            optimizer.step()
        resident = _snapshot(tracker)
    peak = _snapshot(tracker, "peak")
    lora = sum(p.numel() for p in module.parameters() if p.requires_grad)
    dequant = dequant_transient_bytes(module)
    if dequant:
        notes.append(
            f"+ up to {dequant / 2**20:.0f} MiB inside CUDA's gemm_4bit (one dequantized weight) not in the peak"
        )
    return {
        "setting": setting.label,
        "fake": fake is not None,
        "steps": steps,
        "peak_bytes": sum(peak.values()),
        "breakdown": peak,
        "resident_bytes": sum(resident.values()),
        "denoiser_params": logical_params(module.denoiser) - lora,
        "frozen_params": logical_params(module) - lora,
        "lora_params": lora,
        "nf4_dequant_bytes": dequant,
        "optimizer": type(optimizer).__name__,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }


UNITS = {"GiB": 2**30, "MiB": 2**20}
TABLE_KINDS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "batch")


def memory_table(results: list[dict]) -> str:
    """Estimates as a Markdown table: the peak, its breakdown, and what stays between steps.

    In GiB, or in MiB when every peak is below 1 GiB (the small CPU-sized settings)."""
    unit = "GiB" if any(result["peak_bytes"] >= UNITS["GiB"] for result in results) else "MiB"
    scale = UNITS[unit]
    lines = [
        f"| setting | peak {unit} | "
        + " | ".join(kind.replace("_", " ") for kind in TABLE_KINDS)
        + f" | between steps {unit} | LoRA params | notes |",
        "|---" * (len(TABLE_KINDS) + 5) + "|",
    ]
    for result in results:
        kinds = " | ".join(f"{result['breakdown'][kind] / scale:.3f}" for kind in TABLE_KINDS)
        lines.append(
            f"| {result['setting']} | **{result['peak_bytes'] / scale:.2f}** | {kinds} | "
            f"{result['resident_bytes'] / scale:.2f} | {result['lora_params'] / 1e6:.2f} M | "
            f"{'; '.join(result['notes'])} |"
        )
    return "\n".join(lines)
