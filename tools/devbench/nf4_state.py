"""NF4 weights in the memory estimate: bitsandbytes' own layers and kernels, on fake tensors.

A denoiser loaded with ``model.quantization: nf4`` holds bitsandbytes ``Linear4bit`` layers (PEFT
wraps its LoRA around them); their forward runs bitsandbytes' ``gemm_4bit`` op and their backward
its ``dequantize_4bit`` op, both of which have fake-tensor kernels in bitsandbytes >= 0.46, so the
estimate runs the real layers, PEFT's real 4-bit LoRA layer and the real ops. Three things need help:

- a ``Params4bit`` cannot hold a fake tensor (both are tensor subclasses), so
  :func:`fake_params4bit` puts the packed weight in a plain frozen ``Parameter`` carrying the
  attributes ``Linear4bit.forward`` reads (its ``quant_state`` with fake block scales);
- a weight's block scales (``absmax``, float32 per 64 values) and code table live in its
  ``quant_state``, outside the module's parameters, where ``MemTracker`` would not see them:
  :func:`expose_quant_state` registers them as frozen parameters of their layer (same storage);
- inside CUDA's ``gemm_4bit``, inputs of more than 1536 rows (every Flux step at 1024²) take the
  dequantize-then-``F.linear`` path, which holds one dequantized weight for the duration of that
  op; no tracker sees inside an op, so :func:`dequant_transient_bytes` gives the largest such weight
  as a bound the estimate reports beside its peak (bitsandbytes/backends/cuda/ops.py, ``_dequant_linear_fallback``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

EXPOSED = ("weight_absmax", "weight_code")
# Attributes of a Params4bit that bitsandbytes' and PEFT's 4-bit layers read.
_PARAMS4BIT_ATTRIBUTES = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized")


def is_nf4(param: torch.Tensor) -> bool:
    return getattr(param, "quant_state", None) is not None


def fake_params4bit(param: torch.Tensor, fake: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Parameter:
    """A plain frozen Parameter of ``fake(param)`` standing in for the ``Params4bit`` ``param``."""
    state = copy.copy(param.quant_state)
    state.absmax, state.code = fake(state.absmax), fake(state.code)
    stand_in = torch.nn.Parameter(fake(param.data), requires_grad=False)
    stand_in.quant_state = state
    for name in _PARAMS4BIT_ATTRIBUTES:
        setattr(stand_in, name, getattr(param, name))
    return stand_in


def expose_quant_state(module: torch.nn.Module) -> int:
    """Register every NF4 weight's block scales and code table as frozen parameters of its layer, so
    that they count as the weights they are; returns their bytes."""
    total = 0
    for layer in module.modules():
        weight = layer._parameters.get("weight")
        if weight is None or not is_nf4(weight) or "weight_absmax" in layer._parameters:
            continue
        state = weight.quant_state
        for name, tensor in zip(EXPOSED, (state.absmax, state.code)):
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
            total += tensor.numel() * tensor.element_size()
    return total


def logical_params(module: torch.nn.Module) -> int:
    """Parameter count as loaded from the checkpoint: an NF4 weight counts its values, not its
    packed bytes, and the exposed quantization state is not counted."""
    count = 0
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] in EXPOSED:
            continue
        count += param.quant_state.shape.numel() if is_nf4(param) else param.numel()
    return count


def dequant_transient_bytes(module: torch.nn.Module) -> int:
    """The largest NF4 weight dequantized to its layer's compute dtype (see module docstring)."""
    sizes = [
        layer.weight.quant_state.shape.numel() * layer.compute_dtype.itemsize
        for layer in module.modules()
        if "weight" in layer._parameters and is_nf4(layer.weight) and getattr(layer, "compute_dtype", None)
    ]
    return max(sizes, default=0)
