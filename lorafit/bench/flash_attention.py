"""What a GPU's fused attention allocates, as a stand-in for ``F.scaled_dot_product_attention``.

On a CPU or the meta device ``scaled_dot_product_attention`` may run its math form, which keeps
the whole attention matrix ([B, heads, L, L]) for the backward pass: 320 MiB per self-attention at
SDXL 1024² (4096 tokens, 10 heads, bf16), over 5 GiB for the step. The flash kernel an H100 runs
keeps only its output and the softmax's log-sum-exp. The memory estimate therefore routes every
SDPA call (:func:`flash_attention_memory`) through :class:`FlashAttentionMemory`, which allocates
exactly the tensors of PyTorch's CUDA flash attention (``aten/src/ATen/native/transformers/cuda/
flash_attn/flash_api.cpp``,
``mha_fwd``/``mha_bwd``, and ``_flash_attention_backward`` in ``attention_backward.cu``):

forward, kept for backward: ``out`` [B, L, heads, D] (in q's dtype; returned as the [B, heads, L, D]
view SDPA's callers expect), ``softmax_lse`` [B, heads, L] float32, and q, k, v themselves (views
of the projections, no new memory). Backward: ``dq, dk, dv`` (``empty_like`` of q, k, v),
``softmax_d`` [B, heads, round128(L)] float32 and the ``dq_accum`` accumulator
[B, round128(L), heads, round32(D)] float32, plus contiguous copies of the output gradient and of
``out`` where they are not already contiguous. The kernels' on-chip tiles never reach device
memory. The memory-efficient and cuDNN kernels (chosen for float32 or when flash cannot run) keep
the same O(L) set, give or take a few rows of padding.

On real tensors the values are computed too (with the exact math form, outside any tracking), so
the stand-in is a correct attention and a step through it trains; on fake tensors only the
allocations happen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

from lorafit.errors import LorafitError


def _round(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _has_values(*tensors: torch.Tensor) -> bool:
    return not any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def _flash_layout(like: torch.Tensor, last: int) -> torch.Tensor:
    """An uninitialised [B, heads, L, last] tensor stored as [B, L, heads, last], flash's layout."""
    b, h, length, _ = like.shape
    return like.new_empty(b, length, h, last).transpose(1, 2)


def _math_attention(q, k, v, scale):
    """The exact attention and its log-sum-exp, in float32 where the inputs are narrower."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v.float(), lse


class FlashAttentionMemory(torch.autograd.Function):
    """Attention that allocates and saves what CUDA flash-attention does (see module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = _flash_layout(q, v.shape[-1])
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        if _has_values(q, k, v):
            with _disable_current_modes(), torch.no_grad():  # untracked: a GPU computes this on chip
                values, lse_values = _math_attention(q, k, v, scale)
            out.copy_(values)
            lse.copy_(lse_values)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, _lse = ctx.saved_tensors  # the kernel reads lse; the exact recompute below does not
        b, h, length, d = q.shape
        # The kernel reads [B, L, heads, D] rows: copies only where the gradient or out are laid out otherwise.
        grad_rows = grad_out.transpose(1, 2).contiguous()
        out_rows = out.transpose(1, 2).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        softmax_d = q.new_empty(b, h, _round(length, 128), dtype=torch.float32)
        dq_accum = q.new_empty(b, _round(length, 128), h, _round(d, 32 if d <= 128 else 64), dtype=torch.float32)
        if _has_values(q, k, v, grad_out):
            with _disable_current_modes(), torch.enable_grad():
                leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                values, _ = _math_attention(*leaves, ctx.scale)
                grads = torch.autograd.grad(values, leaves, grad_out.float())
            for target, value in zip((dq, dk, dv), grads):
                target.copy_(value)
        del grad_rows, out_rows, softmax_d, dq_accum  # freed when the kernel returns
        return dq, dk, dv, None


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``'s signature over :class:`FlashAttentionMemory`.

    Under autocast the inputs are cast to the autocast dtype first, as autocast does for SDPA.
    Masks, dropout, causal attention and grouped-query heads are not modelled (the UNets use none).
    """
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise LorafitError(
            "memory estimate: attention with a mask, dropout, causal masking or grouped-query heads "
            "is not modelled (lorafit/bench/flash_attention.py)"
        )
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    return FlashAttentionMemory.apply(query, key, value, scale)


@contextlib.contextmanager
def flash_attention_memory() -> Iterator[None]:
    """While active, ``F.scaled_dot_product_attention`` is :func:`flash_attention`.

    A patch of the function rather than a ``TorchFunctionMode``: a mode is switched off while it
    handles a call, and ``loss.backward()`` is such a call, so the forward passes that gradient
    checkpointing recomputes inside it would escape a mode and save the CPU kernel's tensors.
    diffusers and transformers look the function up on ``torch.nn.functional`` at every call.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
