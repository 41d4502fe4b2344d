"""The machine side of a measurement: synchronised clocks, peak memory, peak FLOP/s, versions.

MFU needs a peak: for known GPUs the vendor's dense (no sparsity) tensor-core figure, for CPUs a
matmul of the same dtype measured on the spot (a CPU has no published peak per thread count).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

# Dense TFLOP/s (NVIDIA data sheets; the "with sparsity" figures are twice these): bf16, fp32 (no TF32).
GPU_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.5, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp32": 35.6},
}


def gpu_peak_key(name: str) -> str | None:
    """The ``GPU_PEAK_TFLOPS`` entry of a CUDA device name (``NVIDIA H100 80GB HBM3`` is an SXM part)."""
    if "H100" in name:
        return "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    return next((key for key in GPU_PEAK_TFLOPS if all(word in name for word in key.split())), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(dtype: torch.dtype, device: torch.device, size: int = 1024, seconds: float = 0.5) -> float:
    """Best sustained TFLOP/s of a square matmul in ``dtype`` here, the CPU's stand-in for a data-sheet peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: first call allocates and picks a kernel
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e12)
    return best


def peak_tflops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) for MFU on ``device`` in bf16 or fp32."""
    kind = "bf16" if bf16 else "fp32"
    if device.type == "cuda":
        key = gpu_peak_key(torch.cuda.get_device_name(device))
        if key:
            return GPU_PEAK_TFLOPS[key][kind], f"{key} data sheet, dense {kind}"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measured_matmul_tflops(dtype, device), f"measured {kind} matmul, {torch.get_num_threads()} threads"


class PeakMemory:
    """Peak memory from ``reset()`` on: CUDA max allocated, or the process's RSS high-water mark on CPU.

    On CPU the figure is the whole process's resident memory (Python, libraries and the model), as
    ``/proc/self/status`` VmHWM counts it; Linux lets a process reset that mark (clear_refs 5).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status")
        if not status.exists():
            return None
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    @property
    def kind(self) -> str:
        return "cuda max allocated" if self.device.type == "cuda" else "process RSS high-water"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment() -> dict[str, str]:
    """Date, versions and commit: what RESULTS.md records beside every figure."""
    versions = {name: importlib.metadata.version(name) for name in ("torch", "lightning", "diffusers", "peft")}
    try:
        commit = subprocess.run(  # noqa: PLW1510 -- no git: no commit in the row
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.date.today().isoformat(),
        **versions,
        "cuda": torch.version.cuda or "none",
        "commit": commit or "unknown",
        "host": os.uname().nodename,
    }
