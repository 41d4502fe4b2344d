"""Run `lorafit` as a user would, in a subprocess of this checkout, and read what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "tiny-demo.yaml"


def lorafit_env(**extra: str) -> dict[str, str]:
    """The environment for a `lorafit` child process: this checkout first on the path, one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAFIT_LOG_LEVEL": "INFO"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def lorafit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafit.cli", *args]


def run_lorafit(*args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        lorafit_command(*args), cwd=REPO, env=lorafit_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return result


def demo_fit_args(model: str, data: str, root: Path, *args: str) -> list[str]:
    """`lorafit fit` on the demo config with a tiny model, quiet, logging every step."""
    return [
        "fit",
        "--config",
        str(DEMO_CONFIG),
        "--model.model",
        model,
        "--data.train_dir",
        data,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
        *args,
    ]


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def lora_file(root: Path, name: str = "ohwx-star") -> dict[str, torch.Tensor]:
    """The final kohya-format LoRA of a demo-config run."""
    return load_file(str(root / "lora" / f"{name}.safetensors"))


def tensorboard_scalars(root: Path, tag: str) -> dict[int, float]:
    """``{step: value}`` of ``tag`` from every TensorBoard event file under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(root.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values
