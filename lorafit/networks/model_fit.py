"""Check a network read from a file against the model it is for, and put it in that model's layout.

``lorafit.load_lora`` and ``lorafit convert`` both run every file through :func:`fit_to_model`
before using it, so a file for another model (or a damaged one) is refused in one line naming the
module and both shapes, instead of being injected, or rewritten into another format, as if it fitted.
The model may be live or built on the meta device (``model_skeleton``): only module sizes are read.

What consumers accept is accepted here too:

- a 1x1 convolution's LoRA stored as 2-D matrices (``[r, C]`` / ``[C, r]``, e.g. SD1.5's
  ``proj_in``/``proj_out`` from tools that treat them as Linears), and a Linear's stored as 1x1
  kernels: ComfyUI multiplies the flattened matrices and reshapes the product to the weight
  (``comfy/weight_adapter/lora.py``), so the two layouts mean the same update;
- text-encoder module names with or without the transformers-4 ``text_model.`` level, whichever
  the installed transformers uses.
"""

from __future__ import annotations

import math

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights, LoraWeights, ModuleWeights

_TEXT_MODEL = "text_model."


def adaptable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d by its name outside PEFT's wrappers (``x``, not ``x.base_layer``)."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in name:
            continue
        while name.endswith(".base_layer"):  # PEFT wraps targeted layers; several adapter types nest
            name = name.removesuffix(".base_layer")
        layers[name] = module
    return layers


def weight_shape(layer: torch.nn.Module) -> tuple[int, ...]:
    """The weight's logical shape (a 4-bit layer's stored tensor is packed, so ask the layer)."""
    if isinstance(layer, torch.nn.Conv2d):
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return (layer.out_features, layer.in_features)


def fit_to_model(weights: LoraWeights, components: dict[str, torch.nn.Module], source: str) -> LoraWeights:
    """``weights`` with module names as ``components`` name them and tensors in their layers' shapes.

    Raises a one-line :class:`LorafitError` for a component or module the model lacks and for a
    tensor that fits no layout of the module's weight.
    """
    fitted: LoraWeights = {}
    for component, modules in weights.items():
        model = components.get(component)
        if model is None:
            raise LorafitError(f"{source}: has weights for {component!r}, which this model does not have")
        layers = adaptable_layers(model)
        out = {}
        for name, module_weights in modules.items():
            live = _live_name(name, layers)
            if live is None:
                raise LorafitError(f"{source}: {component} has no module {name} (a LoRA for another model?)")
            out[live] = fit_module(module_weights, weight_shape(layers[live]), f"{source}: {component} {live}")
        fitted[component] = out
    return fitted


def _live_name(name: str, layers: dict) -> str | None:
    for candidate in (name, _TEXT_MODEL + name, name.removeprefix(_TEXT_MODEL)):
        if candidate in layers:
            return candidate
    return None


def fit_module(weights: ModuleWeights, shape: tuple[int, ...], where: str) -> ModuleWeights:
    """One module's weights checked against its weight ``shape`` (LoRA reshaped between 2-D and 1x1)."""
    if isinstance(weights, LoraModuleWeights):
        return _fit_lora(weights, shape, where)
    delta = weights.delta_weight()
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise LorafitError(f"{where}: {weights.kind} update of shape {tuple(delta.shape)} does not fit weight {shape}")
    return weights


def _fit_lora(weights: LoraModuleWeights, shape: tuple[int, ...], where: str) -> LoraModuleWeights:
    out, inner, kernel = shape[0], shape[1], shape[2:]
    rank = weights.rank
    down_shape, up_shape = (rank, inner, *kernel), (out, rank, *[1] * len(kernel))
    down, up = weights.down, weights.up
    pointwise = math.prod(kernel) == 1  # a Linear or a 1x1 conv: 2-D and 4-D layouts are the same matrix
    if pointwise and tuple(down.flatten(1).shape) == (rank, inner) and tuple(up.flatten(1).shape) == (out, rank):
        down, up = down.reshape(down_shape), up.reshape(up_shape)
    if tuple(down.shape) != down_shape or tuple(up.shape) != up_shape:
        raise LorafitError(
            f"{where}: a LoRA with lora_down {tuple(weights.down.shape)} and lora_up {tuple(weights.up.shape)} "
            f"does not fit weight {shape} (a LoRA for another model?)"
        )
    scale = weights.dora_scale
    if scale is not None:
        axis = weights.dora_axis
        wanted = {0: (out, 1, *[1] * len(kernel)), 1: (1, inner, *[1] * len(kernel))}.get(axis)
        if wanted is None or scale.numel() != math.prod(wanted):
            raise LorafitError(f"{where}: dora_scale {tuple(scale.shape)} does not fit weight {shape} on either axis")
        scale = scale.reshape(wanted)
    return LoraModuleWeights(down, up, weights.alpha, scale)
