"""DoRA normalised per *input* channel, applied at load time (PEFT's DoRA is per output channel only).

Files with ``dora_scale`` of shape ``[1, in]`` (``[1, in, 1, 1]`` for a conv) come from LyCORIS
before 3.2 (``wd_on_output=False``), from OneTrainer (its default) and from most DoRA files
shared for A1111. Their weight is ``W' = V * m / ||V||`` with ``V = W + alpha / rank * up @ down``
and the norm taken over each input column, which is how A1111 (``network.py``,
``apply_weight_decompose``) and ComfyUI (``weight_adapter/base.py``, ``weight_decompose``) merge
them. Scaling columns of ``V`` is scaling the layer's input, so the update is applied without ever
building ``W'``:

    W' x - W x = W ((c - 1) * x) + s * up @ down (c * x),   c = m / ||V||  (one factor per input)

A forward hook on the base layer adds ``strength`` times that to its output, so a strength of 0 is
the base model exactly and other values are ``W + strength (W' - W)``, as in both apps. ``c`` is
computed once from the base weight when the file is loaded.

Training (``model.network.dora_axis: input``) uses the same identity the other way round: a plain
PEFT LoRA adapter plus a learnt magnitude per input channel (``lora_input_magnitude``) on each
layer, and a forward pre-hook that scales the layer's input by ``c``, so the layer computes
``(W + s B A)(c * x) = W' x``. As PEFT does for its DoRA (and the paper, section 4.3), the norm is
not differentiated. The magnitudes start at the base weight's column norms: ``c = 1``, the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights, dora_norm


class InputAxisDora:
    """The update of one input-axis DoRA module on ``layer`` (a Linear or an ungrouped Conv2d)."""

    def __init__(self, layer: torch.nn.Module, weights: LoraModuleWeights, where: str):
        if isinstance(layer, torch.nn.Conv2d) and layer.groups != 1:
            raise LorafitError(f"{where}: DoRA on a grouped convolution is not supported")
        weight = layer.weight.detach()
        lora = replace(weights, dora_scale=None).delta_weight()  # the plain LoRA part, alpha / rank * up @ down
        merged = weight.float() + lora.to(weight.device).reshape(weight.shape)
        factor = weights.dora_scale.float().to(weight.device) / dora_norm(merged, axis=1)
        self.layer = layer
        self.factor = factor.flatten().to(weight.dtype)  # c, one per input channel
        self.down = weights.down.to(weight.device, weight.dtype)
        self.up = weights.up.to(weight.device, weight.dtype)
        self.scale = weights.alpha / weights.rank

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``W' x - W x`` for the layer's input ``x``."""
        layer = self.layer
        if isinstance(layer, torch.nn.Conv2d):
            c = self.factor.view(1, -1, 1, 1)
            conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            if layer.padding_mode != "zeros":
                raise LorafitError(f"DoRA on a convolution with padding_mode={layer.padding_mode!r} is not supported")
            base = F.conv2d(x * (c - 1), layer.weight, None, **conv)
            return base + self.scale * F.conv2d(F.conv2d(x * c, self.down, None, **conv), self.up)
        c = self.factor
        return F.linear(x * (c - 1), layer.weight) + self.scale * F.linear(F.linear(x * c, self.down), self.up)


def attach(layer: torch.nn.Module, dora: InputAxisDora, strength: Callable[[], float]):
    """Add ``strength() * dora.update(input)`` to ``layer``'s output; returns the hook's handle."""

    def add_update(module, args, output):
        scale = strength()
        return output if scale == 0.0 else output + scale * dora.update(args[0])

    return layer.register_forward_hook(add_update)


MAGNITUDE = "lora_input_magnitude"  # on each PEFT layer: a ParameterDict, adapter name -> m [in]


def _base_weight(layer: torch.nn.Module) -> torch.Tensor:
    base = layer.get_base_layer()
    if base.weight.dtype in (torch.uint8, torch.int8):  # bitsandbytes NF4/int8 storage
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base)
    return base.weight


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    return dora_norm(weight.float(), axis=1).flatten()


def add_input_magnitudes(model: torch.nn.Module, adapter: str) -> int:
    """Make the plain LoRA ``adapter`` of every layer of ``model`` a DoRA per input channel (training).

    Returns the number of layers. The magnitudes are float32 and trainable, like the LoRA weights.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    for layer in layers:
        base = layer.get_base_layer()
        if isinstance(base, torch.nn.Conv2d) and base.groups != 1:
            raise LorafitError("model.network.dora_axis: input-axis DoRA on a grouped convolution is not supported")
        if not hasattr(layer, MAGNITUDE):
            layer.add_module(MAGNITUDE, torch.nn.ParameterDict())
            layer.register_forward_pre_hook(_scale_input)
        magnitude = _column_norm(_base_weight(layer).detach()).to(base.weight.device)
        getattr(layer, MAGNITUDE)[adapter] = torch.nn.Parameter(magnitude, requires_grad=True)
    return len(layers)


def input_factor(layer: torch.nn.Module, adapter: str) -> torch.Tensor:
    """``c = m / ||W + s B A||`` per input channel (float32), the norm not differentiated."""
    weight = _base_weight(layer)
    with torch.no_grad():
        delta = layer.get_delta_weight(adapter)  # s B A in the weight's layout (PEFT handles convs)
        norm = _column_norm(weight.float() + delta.float().reshape(weight.shape))
    return getattr(layer, MAGNITUDE)[adapter] / norm


def _scale_input(layer: torch.nn.Module, args: tuple):
    magnitudes = getattr(layer, MAGNITUDE)
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in magnitudes]
    if not active:
        return None
    if len(active) > 1:
        raise LorafitError(f"{len(active)} input-axis DoRA adapters active on one layer; activate one")
    x = args[0]
    factor = input_factor(layer, active[0])
    if isinstance(layer.get_base_layer(), torch.nn.Conv2d):
        factor = factor.view(1, -1, 1, 1)
    return (x * factor.to(x.dtype), *args[1:])


def read_input_magnitude(layer: torch.nn.Module, adapter: str) -> torch.Tensor | None:
    """The trained magnitudes of ``adapter`` as a file's ``dora_scale`` ([1, in(, 1, 1)]), or None."""
    magnitudes = getattr(layer, MAGNITUDE, None)
    if magnitudes is None or adapter not in magnitudes:
        return None
    magnitude = magnitudes[adapter].detach().to("cpu", torch.float32).clone()
    trailing = [1, 1] if isinstance(layer.get_base_layer(), torch.nn.Conv2d) else []
    return magnitude.reshape(1, -1, *trailing)
