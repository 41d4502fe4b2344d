"""Ground truth for loaded networks: merge a file's update into the base weights by hand.

The updates come from ``LoraWeights.delta_weight``, whose formulas follow how A1111/ComfyUI read
each kind (``W + alpha / rank * up @ down`` and the LyCORIS kinds); tests compare what a loader
produces with a pipeline whose weights were patched this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafit.networks.files import read_lora_file
from lorafit.networks.kohya_format import kohya_name_table
from lorafit.networks.lora_weights import delta_weight
from lorafit.networks.model_fit import fit_to_model


def pipeline(model_dir: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir)


def components(pipe) -> dict[str, torch.nn.Module]:
    found = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        found["text_encoder_2"] = pipe.text_encoder_2
    return found


def family(pipe) -> str:
    from lorafit.families.loading import detect_family

    return detect_family(pipe.unet.config, getattr(pipe, "text_encoder_2", None) is not None)


@torch.no_grad()
def merge_into(pipe, path, strength: float | Callable[[str, str], float] = 1.0):
    """Patch ``pipe``'s weights in place: ``W += strength * (W' - W)`` for every module in ``path``.

    ``strength`` may be a function of (component, module path): a strength per module (block weights).
    """
    parts = components(pipe)
    weights, _, _ = read_lora_file(path, kohya_name_table(family(pipe), parts))
    weights = fit_to_model(weights, parts, str(path))  # text-encoder names as the installed transformers has them
    for component, modules in weights.items():
        named = dict(parts[component].named_modules())
        for name, module in modules.items():
            base = named[name].weight
            scale = strength(component, name) if callable(strength) else strength
            base += scale * delta_weight(module, base).to(base.dtype)
    return pipe


@torch.no_grad()
def text_outputs(pipe) -> list[torch.Tensor]:
    ids = pipe.tokenizer(
        ["ohwx star, a yellow star"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return [encoder(ids, output_hidden_states=True).hidden_states[-2] for encoder in encoders]
