"""Turn measurements into result rows: images/s, step time, peak memory, MFU, the Lightning/reference ratio.

MFU counts *model* FLOPs (the step without gradient checkpointing's recomputed forward), the usual
definition; ``hfu`` counts what the hardware actually ran, recomputation included, and differs
only for checkpointed rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from lorafit.bench.flops import step_flops
from lorafit.bench.module import BenchLoraModule
from lorafit.bench.settings import BenchSetting

COLUMNS = (
    "setting",
    "images_per_s",
    "step_ms",
    "peak_gib",
    "tflop_per_image",
    "mfu",
    "hfu",
    "reference_images_per_s",
    "lightning_over_reference",
    "host_syncs_per_step",
    "reference_host_syncs_per_step",
)


@functools.cache
def counted_step_flops(setting: BenchSetting, gradient_checkpointing: bool) -> int:
    """FLOPs of one step of ``setting`` (whole batch), counted on meta; cached per distinct shape."""
    # Neither compile nor checkpointing changes the module built (checkpointing is set below).
    kwargs = dataclasses.replace(setting, compile=False, gradient_checkpointing=False).module_kwargs()
    module = BenchLoraModule(
        setting.family, setting.width_divisor, build_device="meta", with_vae=setting.latents == "vae", **kwargs
    )
    return step_flops(
        module,
        setting.resolution,
        setting.batch_size,
        setting.latents == "cached",
        gradient_checkpointing=gradient_checkpointing,
    )


def _flop_key(setting: BenchSetting) -> BenchSetting:
    # Only shapes and graph matter to the count: drop the knobs that change neither. NF4 counts as
    # its bf16 model: MFU counts the model's FLOPs, and dequantizing a weight is no matmul FLOP.
    return dataclasses.replace(
        setting,
        quantization="none",
        precision="fp32",
        sdpa="default",
        channels_last=False,
        compile=False,
        optimizer="adamw",
        gradient_checkpointing=False,
    )


def result_row(setting: BenchSetting, measured: dict, peak_tflops: float, device: str, environment: dict) -> dict:
    """One complete row: the setting, the measurements and what follows from them."""
    key = _flop_key(setting)
    model_flops = counted_step_flops(key, False)
    hardware_flops = counted_step_flops(key, True) if setting.gradient_checkpointing else model_flops
    row = {
        "setting": setting.label,
        **dataclasses.asdict(setting),
        "device": device,
        **environment,
        "peak_tflops": peak_tflops,
        "tflop_per_image": model_flops / setting.batch_size / 1e12,
        "trainable_params": measured.get("trainable_params"),
    }
    step = measured.get("lightning_step_s")
    reference = measured.get("reference_step_s")
    if step:
        row.update(
            images_per_s=setting.batch_size / step,
            step_ms=step * 1e3,
            peak_gib=_gib(measured.get("lightning_peak_bytes")),
            mfu=model_flops / step / (peak_tflops * 1e12),
            hfu=hardware_flops / step / (peak_tflops * 1e12),
        )
    if reference:
        row.update(
            reference_images_per_s=setting.batch_size / reference,
            reference_step_ms=reference * 1e3,
            reference_peak_gib=_gib(measured.get("reference_peak_bytes")),
        )
    if step and reference:
        row["lightning_over_reference"] = step / reference
    for loop, prefix in (("lightning", ""), ("reference", "reference_")):
        if f"{loop}_host_syncs" in measured:
            row[f"{prefix}host_syncs_per_step"] = measured[f"{loop}_host_syncs"]
            row[f"{prefix}host_sync_sites"] = measured[f"{loop}_host_sync_sites"]
    return row


def _gib(value: int | None) -> float | None:
    return None if value is None else value / 2**30


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (MFU/HFU in percent)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.get(column)
            if column in ("mfu", "hfu") and value is not None:
                cells.append(f"{value:.1%}")
            else:
                cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_jsonl(rows: list[dict], path) -> None:
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
