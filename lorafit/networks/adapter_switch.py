"""Switch every PEFT adapter of some modules off, or to another strength, for a while.

Sampling shows the base beside the LoRA with it, and the output-preserving prior
(:mod:`lorafit.training.output_prior`) takes the base's prediction as its target, both from the same
modules with their adapters off, so no second copy of a model is ever loaded. A concept slider
(:mod:`lorafit.training.slider`) trains its LoRA at strength +1 and -1 (:func:`adapter_strength`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _tuner_layers(modules: Iterable[torch.nn.Module]) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for module in modules for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: every PEFT adapter in ``modules`` off, then back on as it was.

    PEFT's ``enable_adapters`` also flips ``requires_grad`` of the adapter weights, so the flags
    are restored explicitly: sampling mid-training must not freeze the LoRA it samples.
    """
    modules = list(modules)
    layers = [layer for layer in _tuner_layers(modules) if not layer.disable_adapters]
    flags = {p: p.requires_grad for m in modules for p in m.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in flags.items():
            param.requires_grad_(flag)


@contextlib.contextmanager
def adapter_strength(modules: Iterable[torch.nn.Module], strength: float) -> Iterator[None]:
    """Run every PEFT adapter in ``modules`` at ``strength`` times its scale (-1: the update subtracted),
    then restore the scales exactly.

    PEFT's LoRA, LoHa and LoKr layers multiply their update by ``scaling[adapter]``, a Python float
    read in each forward, so a forward run inside this context keeps its strength in the autograd
    graph after the context ends (not so for a forward recomputed later by gradient checkpointing).
    DoRA's scale sits inside its weight norm and is not a strength; the slider refuses DoRA.
    """
    saved = [(layer.scaling, dict(layer.scaling)) for layer in _tuner_layers(modules) if hasattr(layer, "scaling")]
    for scaling, original in saved:
        for adapter, scale in original.items():
            scaling[adapter] = scale * strength
    try:
        yield
    finally:
        for scaling, original in saved:
            scaling.update(original)
