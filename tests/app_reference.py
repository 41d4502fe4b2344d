"""How A1111 / ComfyUI / LyCORIS read a kohya-format network file, written out independently.

These formulas work on the raw tensors of a file, by key name, without lorafit's readers: a test
that merges a file this way and gets the training-time model's outputs shows the file means in
those apps what it meant in training. Sources (read, not copied): ComfyUI
``comfy/weight_adapter/{lora,loha,lokr}.py``, A1111 ``extensions-builtin/Lora/network_*.py``,
LyCORIS ``lycoris/modules/locon.py`` (``apply_weight_decompose``, ``wd_on_out=True``).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from lorafit.networks.kohya_format import kohya_name_table


def _lora(t: dict, shape) -> tuple[torch.Tensor, float]:
    up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
    scale = t["alpha"].item() / down.shape[0] if "alpha" in t else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(shape), scale


def _loha(t: dict, shape) -> tuple[torch.Tensor, float]:
    w1 = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
    w2 = t["hada_w2_a"].float() @ t["hada_w2_b"].float()
    scale = t["alpha"].item() / t["hada_w1_b"].shape[0] if "alpha" in t else 1.0
    return (w1 * w2).reshape(shape), scale


def _lokr(t: dict, shape) -> tuple[torch.Tensor, float]:
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float().flatten(1)
    w1, w2 = w1.float(), w2.float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = t["alpha"].item() / dim if "alpha" in t and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape), scale


@torch.no_grad()
def patched_weight(weight: torch.Tensor, tensors: dict, strength: float = 1.0) -> torch.Tensor:
    """The weight an app uses for one module: ``W + strength * (W' - W)``."""
    if "lora_up.weight" in tensors:
        diff, scale = _lora(tensors, weight.shape)
    elif "hada_w1_a" in tensors:
        diff, scale = _loha(tensors, weight.shape)
    else:
        diff, scale = _lokr(tensors, weight.shape)
    merged = weight.float() + scale * diff
    if "dora_scale" in tensors:  # LyCORIS wd_on_out: norm of the merged weight per output channel
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        merged = merged * (tensors["dora_scale"].float() / (norm + torch.finfo(torch.float32).eps))
    return (weight.float() + strength * (merged - weight.float())).to(weight.dtype)


@torch.no_grad()
def apply_kohya_file(pipe, family: str, path, strength: float = 1.0):
    """Patch ``pipe``'s UNet/text encoders in place the way A1111/ComfyUI apply a kohya file."""
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = pipe.text_encoder_2
    table = kohya_name_table(family, components)
    by_stem: dict[str, dict] = {}
    for key, tensor in load_file(str(path)).items():
        stem, _, part = key.partition(".")
        by_stem.setdefault(stem, {})[part] = tensor
    for stem, tensors in by_stem.items():
        component, module = table[stem]
        layer = components[component].get_submodule(module)
        layer.weight.copy_(patched_weight(layer.weight, tensors, strength))
    return pipe


# ComfyUI comfy/lora.py, model_lora_keys_clip: the diffusers-format names it maps onto CLIP layers
# ("text_encoder.text_model.encoder.layers.{b}.{c}  #diffusers lora"); any other spelling is not loaded.
_COMFY_CLIP_PARTS = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.k_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


def comfy_diffusers_clip_keys(component: str, num_layers: int) -> set[str]:
    return {f"{component}.text_model.encoder.layers.{b}.{c}" for b in range(num_layers) for c in _COMFY_CLIP_PARTS}
