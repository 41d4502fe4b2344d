"""The frozen denoiser in bitsandbytes NF4, as ``model.quantization: nf4`` loads it, from random weights.

lorafit's loader hands diffusers a ``PipelineQuantizationConfig`` (``lorafit.families.loading.quantization_config``),
and diffusers' bitsandbytes quantizer then (1) swaps every ``nn.Linear`` of the denoiser for a
``bnb.nn.Linear4bit`` (``replace_with_bnb_linear``; it skips ``_keep_in_fp32_modules`` and
``llm_int8_skip_modules``, neither of which Flux or the UNets set) and (2) wraps each loaded weight
in a ``Params4bit`` built with the new parameter's settings and moves it to the device, which
quantizes it. The bench has random weights instead of a file, so it runs those same two steps on
the weights it built, with the same config: same modules, storage and compute dtype as a real run.

On the ``meta`` device bitsandbytes does not quantize on ``.to()``; :func:`quantize_nf4` calls its
quantizer directly there, whose meta kernel gives the packed weight and block scales their real
shapes: the memory estimate (tools/devbench/memory.py) runs NF4 models on fake tensors from them.

:func:`nf4_bytes` is the storage of one quantized weight by bitsandbytes' layout: 4 bits per
weight packed two per byte, plus one float32 absmax per block of 64 weights (no double
quantization: diffusers' ``bnb_4bit_use_double_quant`` defaults to off, and lorafit leaves it).
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError

BLOCKSIZE = 64  # bitsandbytes' 4-bit block size (Params4bit's default; diffusers does not change it)


def bnb_config(compute_dtype: torch.dtype):
    """diffusers' ``BitsAndBytesConfig`` with the arguments lorafit's loader gives it for ``nf4``."""
    from diffusers import BitsAndBytesConfig

    from lorafit.families.loading import quantization_config
    from lorafit.families.registry import get_family

    # The loader's own arguments (its family only names the component to quantize).
    kwargs = quantization_config("nf4", get_family("flux"), compute_dtype).quant_kwargs
    return BitsAndBytesConfig(**kwargs)


def quantize_nf4(denoiser: torch.nn.Module, compute_dtype: torch.dtype, device: str | torch.device) -> int:
    """Replace ``denoiser``'s Linears by bitsandbytes NF4 ones holding their weights, quantized on
    ``device`` (``meta``: shapes only); returns how many were quantized."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorafitError("bench --quantization nf4 needs bitsandbytes; pip install 'lorafit[bnb]'") from None
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    weights = {
        name: (module.weight.data, None if module.bias is None else module.bias.data)
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    replace_with_bnb_linear(denoiser, modules_to_not_convert=[], quantization_config=bnb_config(compute_dtype))
    device = torch.device(device)
    count = 0
    for name, module in denoiser.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight, bias = weights.pop(name)  # each full-precision weight is freed once quantized
        # What diffusers' create_quantized_param does with a loaded weight: the new Params4bit's settings.
        param = bnb.nn.Params4bit(weight, requires_grad=False, **module.weight.__dict__)
        param = param._quantize(device) if device.type == "meta" else param.to(device)
        module._parameters["weight"] = param
        if bias is not None:
            module._parameters["bias"] = torch.nn.Parameter(bias, requires_grad=False)
        count += 1
    return count


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes stores for one NF4 weight of ``numel`` values: packed 4-bit codes and
    a float32 absmax per 64-value block."""
    return (numel + 1) // 2 + 4 * -(-numel // BLOCKSIZE)


def quantized_weights(denoiser: torch.nn.Module) -> dict[str, int]:
    """The number of values of every weight ``model.quantization: nf4`` stores in NF4, by module name:
    the Linears diffusers' ``replace_with_bnb_linear`` converts (run on a copy-free meta walk)."""
    return {
        name: module.in_features * module.out_features
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
