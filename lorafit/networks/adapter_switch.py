"""Switch every PEFT adapter of some modules off for a while: the base model's own output.

Sampling shows the base beside the LoRA with it, and the output-preserving prior
(:mod:`lorafit.training.output_prior`) takes the base's prediction as its target, both from the same
modules with their adapters off, so no second copy of a model is ever loaded.
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
