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
