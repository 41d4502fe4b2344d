"""The peak-memory estimate (tools/devbench/memory.py): its count on fake tensors is the count of the real step.

Each comparison runs lorafit's step twice on the same small setting (the real SD1.5 block layout at
1/8 width): on fake tensors (the estimate) and on real CPU tensors, under the same tracker, the
same autocast policy. Everything a full-size estimate adds is size.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafit.bench.settings import BenchSetting

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/devbench: not in the wheel

# The real SD1.5 block layout at 1/8 width, bf16 weights under (CUDA's) autocast and torch's AdamW
# (foreach): what a full-size estimate models, CPU-sized. (Gradient checkpointing, the other
# optimizers, the VAE and SDXL compare the same way: benchmarks/memory.md, `--check-real`; a test
# of each would take minutes.)
SMALL = BenchSetting(
    family="sd1", resolution=64, batch_size=1, width_divisor=8, rank=4, precision="bf16-weights", optimizer="adamw"
)


@pytest.fixture(scope="module")
def small_runs() -> tuple[dict, dict]:
    """Two steps of SMALL on fake tensors (the estimate) and on real CPU tensors."""
    from devbench.memory import estimate_step_memory, measure_step_memory

    return estimate_step_memory(SMALL), measure_step_memory(SMALL)


def _saved_by(call) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        call()
    return saved


def test_attention_on_fake_tensors_keeps_no_score_matrix_as_cuda_flash_attention_keeps_none():
    """Why the estimate needs no attention stand-in (benchmarks/memory.md measured it: no byte changes).

    For the UNets' attention (bf16 under autocast, no mask, no dropout) PyTorch's CPU dispatch runs
    its flash kernel, which keeps q, k, v, the output and a float32 log-sum-exp per query row, the
    tensors CUDA's flash kernel keeps; the math form would keep the [L, L] score matrix.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    length, dim = 48, 16
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = (torch.empty(2, 5, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        saved = _saved_by(lambda: F.scaled_dot_product_attention(q, k, v))
    assert not any(t.shape[-2:] == (length, length) for t in saved)
    shapes = sorted((tuple(t.shape), t.dtype) for t in saved)
    assert ((2, 5, length), torch.float32) in shapes  # the log-sum-exp
    assert shapes.count(((2, 5, length, dim), torch.bfloat16)) == 4  # q, k, v, output
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # sdpa=math rows
        q, k, v = (torch.randn(2, 5, length, dim, requires_grad=True) for _ in range(3))
        math = _saved_by(lambda: F.scaled_dot_product_attention(q, k, v))
    assert any(t.shape[-2:] == (length, length) for t in math)


def test_autocast_follows_cuda_lists_while_active_and_cpu_lists_after():
    from devbench.cuda_autocast import cuda_autocast_policy
    from torch._subclasses.fake_tensor import FakeTensorMode

    def dtypes(x, weight):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return {
                "linear": F.linear(x.flatten(1), weight).dtype,
                "matmul": (x @ x).dtype,
                "baddbmm": torch.baddbmm(x[0], x[0], x[0]).dtype,
                "conv2d": F.conv2d(x, x).dtype,
                "group_norm": F.group_norm(x, 2).dtype,
                "layer_norm": F.layer_norm(x, (4,)).dtype,
                "softmax": x.softmax(-1).dtype,
                "upsample": F.interpolate(x, scale_factor=2.0).dtype,
            }

    # float32 inputs, as the UNet's float32 LoRA weights and norm outputs are
    x, weight = torch.randn(8, 8, 4, 4), torch.randn(8, 128)
    low = {"linear", "matmul", "baddbmm", "conv2d"}
    cuda = {name: torch.bfloat16 if name in low else torch.float32 for name in dtypes(x, weight)}
    with cuda_autocast_policy():
        assert dtypes(x, weight) == cuda
        assert dtypes(x.bfloat16(), weight)["group_norm"] == torch.float32  # bf16 in, float32 out
        with FakeTensorMode(allow_non_fake_inputs=True):  # the estimate's tensors
            assert dtypes(torch.empty(8, 8, 4, 4), torch.empty(8, 128)) == cuda
    # CPU autocast leaves norms, softmax and upsampling in the input's dtype: the policy is gone again.
    assert dtypes(x.bfloat16(), weight) == dict.fromkeys(cuda, torch.bfloat16)


@pytest.mark.slow
def test_estimate_on_fake_tensors_equals_the_real_cpu_step(small_runs):
    estimate, real = small_runs
    assert estimate["fake"] and not real["fake"]
    assert estimate["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.01)
    assert estimate["resident_bytes"] == pytest.approx(real["resident_bytes"], rel=0.01)
    for kind, value in real["breakdown"].items():
        assert estimate["breakdown"][kind] == pytest.approx(value, rel=0.01, abs=4096), kind
    # Two steps: the optimizer's state (two float32 moments per LoRA weight) exists at the peak.
    assert estimate["breakdown"]["optimizer_state"] >= 2 * 4 * estimate["lora_params"]
    assert estimate["breakdown"]["activations"] > 0


@pytest.mark.slow
def test_checkpointing_lowers_the_activation_peak(small_runs):
    from devbench.memory import estimate_step_memory

    stored = small_runs[0]
    # One step is enough for activations (the optimizer state is not compared).
    checkpointed = estimate_step_memory(dataclasses.replace(SMALL, gradient_checkpointing=True), steps=1)

    def activation_peak(result):
        return result["breakdown"]["activations"] + result["breakdown"]["temporaries"]

    assert activation_peak(checkpointed) < 0.5 * activation_peak(stored)
    assert checkpointed["breakdown"]["parameters"] == stored["breakdown"]["parameters"]


def test_full_size_sdxl_parameters_are_bf16_base_plus_float32_lora():
    from devbench.memory import estimate_step_memory

    from lorafit.bench.architectures import ARCHITECTURES

    # The SDXL row, as loaded (steps=0: a step adds no parameters).
    result = estimate_step_memory(BenchSetting(precision="bf16-weights"), steps=0)
    assert result["peak_bytes"] == result["resident_bytes"]
    published = ARCHITECTURES["sdxl"].denoiser_params
    assert result["denoiser_params"] == published
    # Rank 32 on q, k, v, out of both attentions of SDXL's transformer blocks: 10 at width 640, 60 at
    # 1280; the cross-attention's k and v read the 2048-wide text embeddings. LoRA of a linear: r * (in + out).
    rank = 32

    def block(width):
        return 4 * rank * 2 * width + 2 * rank * 2 * width + 2 * rank * (2048 + width)

    assert result["lora_params"] == 10 * block(640) + 60 * block(1280)
    assert result["breakdown"]["parameters"] == 2 * published + 4 * result["lora_params"]
