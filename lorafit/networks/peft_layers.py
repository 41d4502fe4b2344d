"""Move module weights between live PEFT layers and :mod:`lora_weights`, for every network kind.

PEFT names and shapes differ from the files in three places, all handled here:

- DoRA's magnitude: PEFT keeps ``lora_magnitude_vector[adapter].weight`` as ``[out]`` (Linear) or
  ``[1, out, 1, 1]`` (Conv2d); LyCORIS files hold ``dora_scale`` as ``[out, 1]`` / ``[out, 1, 1, 1]``.
  Both normalise per output channel (LyCORIS ``wd_on_out=True``), so only the shape changes. DoRA
  per input channel (:mod:`lorafit.networks.input_dora`) keeps ``lora_input_magnitude`` ``[in]``,
  written as ``[1, in(, 1, 1)]``.
- LoKr with both factors full: PEFT scales by ``alpha / r``, the apps by 1, so that factor is folded
  into ``w1`` on export and the layer's scale set from the file's reading on load.
- LoKr factorisations from other tools need not be the ones PEFT would choose for a rank, so on
  load the layer's parameters are replaced by the file's tensors, whatever their split.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from lorafit.errors import LorafitError
from lorafit.networks.input_dora import read_input_magnitude
from lorafit.networks.lora_weights import LoraModuleWeights, LoraWeights, ModuleWeights
from lorafit.networks.lycoris_weights import LohaModuleWeights, LokrModuleWeights

_LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def adapter_layers(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """Every PEFT layer of ``model`` holding ``adapter``, by its name in ``model``.

    When adapters of two kinds sit on one module, PEFT nests the wrappers (``x`` and
    ``x.base_layer``); each holds only its own adapters, so each is found under its own name.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter in module._all_available_adapter_names()
    }


def outer_name(name: str) -> str:
    """The module name a file uses for a (possibly nested) PEFT layer name."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name


def read_layer(layer: torch.nn.Module, adapter: str) -> ModuleWeights:
    """The weights ``adapter`` holds in ``layer`` (detached float32 CPU copies)."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        # contiguous: a channels-last conv weight (model.channels_last) would not serialize as-is.
        return tensor.detach().to("cpu", torch.float32).contiguous().clone()

    if isinstance(layer, LoraLayer):
        down, up = copy(layer.lora_A[adapter].weight), copy(layer.lora_B[adapter].weight)
        dora_scale = read_input_magnitude(layer, adapter)  # DoRA per input channel (input_dora.py)
        if adapter in layer.lora_magnitude_vector:
            magnitude = copy(layer.lora_magnitude_vector[adapter].weight).flatten()
            dora_scale = magnitude.reshape(-1, *[1] * (down.dim() - 1))
        return LoraModuleWeights(down, up, float(layer.lora_alpha[adapter]), dora_scale)
    if isinstance(layer, LoHaLayer):
        if adapter in layer.hada_t1:
            raise LorafitError("LoHa with effective (Tucker) conv2d weights has no kohya/LyCORIS export here")
        return LohaModuleWeights(
            *(copy(getattr(layer, f"hada_{n}")[adapter]) for n in ("w1_a", "w1_b", "w2_a", "w2_b")),
            alpha=float(layer.alpha[adapter]),
        )
    if isinstance(layer, LoKrLayer):
        if adapter in layer.lokr_t2:
            raise LorafitError("LoKr with effective (Tucker) conv2d weights has no kohya/LyCORIS export here")
        tensors = {
            n.removeprefix("lokr_"): copy(getattr(layer, n)[adapter])
            for n in _LOKR_PARAMS
            if adapter in getattr(layer, n)
        }
        module = LokrModuleWeights(alpha=float(layer.alpha[adapter]), **tensors)
        if module.rank is None:
            # Apps scale a full-by-full LoKr by 1: fold PEFT's alpha / r into w1 (and record alpha = r,
            # as LyCORIS does for such modules).
            module.w1 = module.w1 * layer.scaling[adapter]
            module.alpha = float(layer.r[adapter])
        return module
    raise LorafitError(f"{type(layer).__name__} is not a LoRA/LoHa/LoKr layer")


def write_layer(layer: torch.nn.Module, adapter: str, weights: ModuleWeights) -> None:
    """Put ``weights`` into ``adapter`` of an injected ``layer`` (scale included), in its device and dtype."""

    def assign(parameter: torch.nn.Parameter, tensor: torch.Tensor, reshape: bool = False) -> None:
        if (tensor.numel() != parameter.numel()) if reshape else (tensor.shape != parameter.shape):
            raise LorafitError(f"shape {tuple(tensor.shape)} does not fit {tuple(parameter.shape)}")
        parameter.data = tensor.reshape(parameter.shape).to(parameter.device, parameter.dtype)

    base_shape = tuple(layer.get_base_layer().weight.shape)
    if not isinstance(weights, LoraModuleWeights):  # LoRA's shapes are checked parameter by parameter
        delta = weights.delta_weight()
        rows = delta.shape[0]
        if delta.numel() != torch.Size(base_shape).numel() or rows != base_shape[0]:
            raise LorafitError(f"{weights.kind} update of shape {tuple(delta.shape)} does not fit weight {base_shape}")
    if isinstance(weights, LoraModuleWeights):
        assign(layer.lora_A[adapter].weight, weights.down)
        assign(layer.lora_B[adapter].weight, weights.up)
        if weights.dora_scale is not None:
            assign(layer.lora_magnitude_vector[adapter].weight, weights.dora_scale, reshape=True)
        layer.lora_alpha[adapter] = weights.alpha
        layer.scaling[adapter] = weights.alpha / weights.rank
    elif isinstance(weights, LohaModuleWeights):
        for name, tensor in weights.parts().items():
            assign(getattr(layer, name)[adapter], tensor)
        layer.alpha[adapter] = weights.alpha
        layer.scaling[adapter] = weights.alpha / weights.rank
    elif isinstance(weights, LokrModuleWeights):
        created = next(getattr(layer, n)[adapter] for n in _LOKR_PARAMS if adapter in getattr(layer, n))
        device, dtype = created.device, created.dtype
        for name in _LOKR_PARAMS:
            if adapter in getattr(layer, name):
                del getattr(layer, name)[adapter]
        for name, tensor in weights.parts().items():
            getattr(layer, name)[adapter] = torch.nn.Parameter(tensor.to(device, dtype), requires_grad=False)
        rank = weights.rank or 1
        layer.r[adapter] = rank
        layer.alpha[adapter] = weights.scale * rank
        layer.scaling[adapter] = weights.scale
    else:
        raise LorafitError(f"unknown module weights {type(weights).__name__}")


def from_peft_model(components: dict[str, torch.nn.Module], adapter: str) -> LoraWeights:
    """Read ``adapter`` from each live component: ``{component: {module: weights}}``."""
    result: LoraWeights = {}
    for component, model in components.items():
        modules = {
            outer_name(name): read_layer(layer, adapter) for name, layer in adapter_layers(model, adapter).items()
        }
        if modules:
            result[component] = dict(sorted(modules.items()))
    return result


def injection_config(kind: str, modules: dict[str, ModuleWeights]):
    """A PEFT config that creates a layer of the right kind and rank on exactly ``modules``.

    Alphas are not encoded here: :func:`write_layer` sets each layer's scale from its weights.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = sorted(modules)
    if kind == "lokr":  # parameters are replaced by the file's in write_layer; keep the placeholders tiny
        return LoKrConfig(r=1, alpha=1.0, target_modules=targets)
    ranks = Counter(m.rank for m in modules.values())
    rank = ranks.most_common(1)[0][0]
    pattern = {re.escape(name): m.rank for name, m in modules.items() if m.rank != rank}
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=float(rank), target_modules=targets, rank_pattern=pattern)
    return LoraConfig(
        r=rank, lora_alpha=float(rank), target_modules=targets, rank_pattern=pattern, use_dora=kind == "dora"
    )
