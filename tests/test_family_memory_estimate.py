"""tools/estimate_family_memory.py: the full-size family rows of benchmarks/memory.md rest on the released
model's size, and its quantized rows are derived from the bf16 one by replacing the frozen weights only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    sys.path.insert(0, str(REPO / "tools"))  # devbench, which the tool imports
    path = REPO / "tools" / "estimate_family_memory.py"
    spec = importlib.util.spec_from_file_location("estimate_family_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_released_qwen_image_transformer_is_the_diffusers_class_default(tool):
    import diffusers

    class_name, published, *_ = tool.RELEASED["qwen-image"]
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)()
    assert sum(p.numel() for p in transformer.parameters()) == published  # Qwen-Image's 20.4 B


def test_quantized_rows_replace_the_frozen_weights_and_add_one_upcast_layer(tool):
    gib = 2**30
    frozen, largest = 20 * 2**30, 50 * 2**20
    breakdown = {"parameters": 2 * frozen + gib, "activations": 3 * gib, "optimizer_state": gib}
    row = dict(frozen_params=frozen, largest_linear=largest, breakdown=breakdown, peak_bytes=sum(breakdown.values()))
    nf4, fp8 = tool.derive(row, "nf4"), tool.derive(row, "fp8")
    assert nf4["derived"] and fp8["derived"] and not row.get("derived")
    assert nf4["breakdown"]["parameters"] == frozen // 2 + 4 * (frozen // 64) + gib  # LoRA weights stay fp32
    assert fp8["breakdown"]["parameters"] == frozen + gib
    assert fp8["peak_bytes"] == frozen + gib + 3 * gib + gib + 2 * largest
    assert nf4["breakdown"]["activations"] == 3 * gib  # activations and optimizer state are the bf16 row's
