"""Time one setting two ways, side by side: lorafit's Lightning step and a plain PyTorch loop.

Both run on the same ``BenchLoraModule`` (same denoiser, same LoRA layers, same optimizer class
and arguments) and the same batches, so their ratio isolates what Lightning and lorafit's step
add. The reference loop (:mod:`lorafit.bench.reference`) is written as diffusers' training
examples write it; no Lightning.
"""

from __future__ import annotations

import contextlib
import tempfile

import lightning.pytorch as pl
import torch

from lorafit.bench.architectures import synthetic_batch
from lorafit.bench.host_syncs import CountHostSyncs, HostSyncCounter
from lorafit.bench.module import BenchLoraModule
from lorafit.bench.reference import Timer, time_reference
from lorafit.bench.settings import BenchSetting
from lorafit.callbacks.metrics import TrainingMetrics


def sdpa_context(backend: str):
    """Force one scaled-dot-product-attention kernel (``default`` lets PyTorch choose)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "math": SDPBackend.MATH,
        }[backend]
    )


def build_module(setting: BenchSetting, device: torch.device) -> BenchLoraModule:
    """lorafit's module for ``setting``, base built straight on ``device`` and LoRA attached."""
    module = BenchLoraModule(
        setting.family,
        setting.width_divisor,
        build_device=str(device),
        with_vae=setting.latents == "vae",
        **setting.module_kwargs(),
    )
    module.configure_model()  # what Trainer.fit calls first; idempotent, so fit() keeps this UNet
    return module.to(device)


def make_batches(setting: BenchSetting, count: int = 2) -> list[dict]:
    """A few distinct CPU batches, copied to the device by each loop (as a DataLoader's would be)."""
    generator = torch.Generator().manual_seed(0)
    return [
        synthetic_batch(
            setting.family,
            setting.resolution,
            setting.batch_size,
            setting.width_divisor,
            setting.latents == "cached",
            generator=generator,
            text_tokens=setting.text_tokens,
        )
        for _ in range(count)
    ]


class _LightningTimer(pl.Callback):
    def __init__(self, timer: Timer):
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.timer.before(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.after(batch_idx)


def _fit(
    module: BenchLoraModule,
    setting: BenchSetting,
    batches: list[dict],
    device: torch.device,
    total: int,
    callbacks: list[pl.Callback],
    progress_bar: bool,
) -> None:
    """``Trainer.fit`` of ``module`` for ``total`` steps on ``batches`` (cycled), with TrainingMetrics, the
    per-step callback every ``lorafit fit`` has, and ``callbacks``."""
    loader = torch.utils.data.DataLoader([batches[i % len(batches)] for i in range(total)], batch_size=None)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            precision=setting.trainer_precision,
            max_steps=total,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress_bar,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[TrainingMetrics(), *callbacks],
        )
        trainer.fit(module, train_dataloaders=loader)


def time_lightning(
    module: BenchLoraModule, setting: BenchSetting, batches: list[dict], device: torch.device, warmup: int, steps: int
) -> Timer:
    """lorafit's Lightning step, timed; returns its timer."""
    timer = Timer(device, warmup, steps)
    _fit(module, setting, batches, device, warmup + steps, [_LightningTimer(timer)], progress_bar=False)
    return timer


def count_host_syncs(
    module: BenchLoraModule, setting: BenchSetting, batches: list[dict], device: torch.device, steps: int = 3
) -> dict:
    """Host syncs per step (lorafit/bench/host_syncs.py) of lorafit's step, as ``lorafit fit`` runs it
    (progress bar and training curves on), and of the reference loop."""
    count = CountHostSyncs(first=1, last=1 + steps)
    _fit(module, setting, batches, device, steps + 2, [count], progress_bar=True)
    reference = HostSyncCounter(device)
    time_reference(module, setting, batches, device, warmup=1, steps=steps, counter=reference)
    return {
        "lightning_host_syncs": count.per_step,
        "reference_host_syncs": reference.count / steps,
        "lightning_host_sync_sites": dict(count.counter.sites),
        "reference_host_sync_sites": dict(reference.sites),
    }


def run_setting(
    setting: BenchSetting,
    device: torch.device,
    warmup: int,
    steps: int,
    loops: tuple[str, ...] = ("lightning", "reference"),
    repeats: int = 1,
    count_syncs: bool = True,
) -> dict:
    """Build the model for ``setting`` and time the chosen loops, interleaved ``repeats`` times.

    Returns seconds per step (the best repeat: on a shared machine the slowest runs measure the
    neighbours) and peak bytes (the highest repeat) of each loop, and (``count_syncs``) both loops'
    host syncs per step, counted in separate short runs after the timed ones.
    """
    module = build_module(setting, device)
    batches = make_batches(setting)
    timers = {"lightning": time_lightning, "reference": time_reference}
    seconds: dict[str, list[float]] = {loop: [] for loop in loops}
    peaks: dict[str, list[int]] = {loop: [] for loop in loops}
    with sdpa_context(setting.sdpa):
        for _ in range(repeats):
            for loop in loops:
                timer = timers[loop](module, setting, batches, device, warmup, steps)
                seconds[loop].append(timer.seconds / steps)
                if timer.peak is not None:
                    peaks[loop].append(timer.peak)
    result = {f"{loop}_step_s": min(seconds[loop]) for loop in loops}
    result.update({f"{loop}_peak_bytes": max(peaks[loop]) if peaks[loop] else None for loop in loops})
    if count_syncs:
        with sdpa_context(setting.sdpa):
            result.update(count_host_syncs(module, setting, batches, device))
    result["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
