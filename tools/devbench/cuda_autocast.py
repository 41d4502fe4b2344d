"""CUDA's autocast policy, applied to CPU tensors: the memory estimate's autocast on a machine without a GPU.

Autocast decides which dtype every activation has, and so most of a bf16 step's activation memory.
CPU and CUDA autocast disagree on exactly the ops a UNet is made of: CUDA runs ``group_norm``,
``layer_norm``, ``softmax``, nearest upsampling and ``mse_loss`` in float32 (their outputs, and
the float32 copies of their inputs, are saved for the backward pass), CPU autocast leaves them in
the input's dtype. An estimate of a GPU step made under CPU autocast would miss those float32
tensors, so :func:`cuda_autocast_policy` replaces the ``AutocastCPU`` kernels with kernels that
follow CUDA's lists, for as long as it is active.

The lists are read from this torch's own ``ATen/autocast_mode.h`` (the ``AT_FORALL_*`` macros its
CUDA kernels are registered from) and checked against the ops that really have an ``AutocastCUDA``
kernel in the dispatcher, so they are the installed version's, not a copy that could drift. (Fake
CUDA tensors with real CUDA autocast are not an option on a CPU-only build: they need a device
guard, "PyTorch is not linked with support for cuda devices".)

The ops both autocasts run in lower precision (linear, convolutions, matmuls) keep their CPU
kernels: they cast the same way and share autocast's cache, which keeps the bf16 copy of each
trainable float32 weight (the LoRA) until the autocast region ends, as on CUDA.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch._C import DispatchKey, DispatchKeySet
from torch.utils._pytree import tree_leaves, tree_map_only

from lorafit.errors import LorafitError

HEADER = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
# Macro -> cast policy of the ops it lists (see CastPolicy in autocast_mode.h).
POLICY_MACROS = {
    "AT_FORALL_LOWER_PRECISION_FP": "lower_precision_fp",
    "AT_FORALL_FP32": "fp32",
    "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype",
    "AT_FORALL_PROMOTE": "promote",
}
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: norm overloads without a dtype redispatch to the
# overload with one, in float32 (policy fp32_append_dtype).
APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
# AutocastCUDA kernels outside the lists: binary_cross_entropy raises under CUDA autocast, and
# cuDNN's convolutions are reached only from CUDA tensors (conv2d is cast before them).
CUDA_ONLY = {"binary_cross_entropy", "cudnn_convolution", "cudnn_convolution_transpose"}
_NO_AUTOCAST = DispatchKeySet(DispatchKey.AutocastCPU)


def cuda_policies(header: Path = HEADER) -> dict[str, str]:
    """``op.overload`` -> CUDA cast policy, read from this torch's autocast header and checked
    against the dispatcher's ``AutocastCUDA`` kernels."""
    if not header.is_file():
        raise LorafitError(
            f"memory estimate: {header} is missing; it needs a torch installation with its "
            "C++ headers (every pip wheel has them)"
        )
    text = header.read_text()
    policies: dict[str, str] = {}
    for macro, policy in POLICY_MACROS.items():
        block = re.search(rf"#define {macro}\(_\)(.*?)(?<!\\)\n", text, re.DOTALL)
        if block is None:
            raise LorafitError(f"memory estimate: {header} has no {macro}; this torch's autocast lists changed")
        for name, overload in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", block.group(1)):
            policies[f"{name}.{overload or 'default'}"] = policy
    policies.update(dict.fromkeys(APPEND_DTYPE, "fp32_append_dtype"))
    registered = {
        op.removeprefix("aten::")
        for op in torch._C._dispatch_get_all_op_names()
        if op.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")
    }
    listed = {name.removesuffix(".default") for name in policies}
    if registered - CUDA_ONLY != listed:
        raise LorafitError(
            f"memory estimate: the autocast lists of {header} and the dispatcher's AutocastCUDA "
            f"kernels differ ({sorted((registered - CUDA_ONLY) ^ listed)}); this torch's autocast "
            "changed, update tools/devbench/cuda_autocast.py"
        )
    return policies


def _eligible(value: Any) -> bool:
    # autocast's is_eligible for CPU: a defined floating tensor that is not float64.
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and value.is_floating_point()
        and value.dtype != torch.float64
    )


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t, tree)


def _promoted(args: tuple, kwargs: dict, low: torch.dtype) -> torch.dtype:
    # promote policy: the widest eligible floating type, starting from the low-precision one.
    dtype = low
    for leaf in tree_leaves((args, kwargs)):
        if _eligible(leaf) and leaf.dtype == torch.float32:
            dtype = torch.float32
    return dtype


def _overload(name: str) -> torch._ops.OpOverload:
    op_name, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op_name), overload or "default")


def _kernel(name: str, policy: str):
    """A Python ``AutocastCPU`` kernel for ``name`` (``op.overload``) that casts as CUDA's ``policy`` does."""
    op = _overload(name)
    dtype_arg = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

    def kernel(*args, **kwargs):
        low = torch.get_autocast_dtype("cpu")
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            if policy == "lower_precision_fp":
                return op(*_cast(args, low), **_cast(kwargs, low))
            if policy == "fp32":
                return op(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
            if policy == "promote":
                dtype = _promoted(args, kwargs, low)
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if policy == "fp32_append_dtype":
                dtype = torch.float32 if _eligible(args[0]) else args[0].dtype
                return _overload(APPEND_DTYPE[name])(*args, **kwargs, dtype=dtype)
            # fp32_set_opt_dtype: an unset output dtype becomes float32 when the first argument is eligible.
            key = op._schema.arguments[dtype_arg].name
            if _eligible(args[0]) and kwargs.get(key) is None and (len(args) <= dtype_arg or args[dtype_arg] is None):
                args, kwargs = args[:dtype_arg], {**kwargs, key: torch.float32}
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """While active, ``torch.autocast("cpu", ...)`` casts exactly as ``torch.autocast("cuda", ...)`` would.

    Every op with an ``AutocastCPU`` kernel gets CUDA's kernel logic, or none (fall through) when
    CUDA autocast leaves it alone, and ``torch.is_autocast_enabled()`` (CUDA's, asked without a
    device) reports CPU autocast. The previous kernels and function come back on exit.
    """
    policies = cuda_policies()
    library = torch.library.Library("aten", "IMPL")
    is_enabled = torch.is_autocast_enabled

    def cuda_is_autocast_enabled(device_type: str | None = None) -> bool:
        # Asked without a device, torch answers for CUDA: PEFT's 4-bit LoRA layers cast their input
        # to float32 (a copy per layer) only when that says no. CPU autocast stands for CUDA's here.
        return is_enabled("cpu" if device_type is None else device_type)

    try:
        with warnings.catch_warnings():  # replacing the registered kernels is the point
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            _register(library, policies)
        torch.is_autocast_enabled = cuda_is_autocast_enabled
        yield
    finally:
        torch.is_autocast_enabled = is_enabled
        library._destroy()


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name.removesuffix('.default')}", "AutocastCPU")


def _register(library: torch.library.Library, policies: dict[str, str]) -> None:
    """CUDA's kernel for every op CUDA autocast casts, except the lower-precision ops CPU autocast
    casts alike (module docstring); a fall-through for the CPU-only rest."""
    for name, policy in policies.items():
        if policy == "lower_precision_fp" and _has_cpu_kernel(name):
            continue
        library.impl(name.removesuffix(".default"), _kernel(name, policy), "AutocastCPU")
    for op in torch._C._dispatch_get_all_op_names():
        name = op.removeprefix("aten::")
        if (
            op.startswith("aten::")
            and torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCPU")
            and (name if "." in name else f"{name}.default") not in policies
        ):
            library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
