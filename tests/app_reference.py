"""How A1111 / ComfyUI / LyCORIS read a kohya-format network file, written out independently.

These formulas work on the raw tensors of a file, by key name, without lorafit's readers: a test
that merges a file this way and gets the training-time model's outputs shows the file means in
those apps what it meant in training. Sources (read, not copied): ComfyUI
``comfy/weight_adapter/{lora,loha,lokr}.py``, A1111 ``extensions-builtin/Lora/network_*.py``,
LyCORIS ``lycoris/modules/locon.py`` (``apply_weight_decompose``, both ``wd_on_out`` settings);
for DoRA also ComfyUI ``comfy/weight_adapter/base.py`` and A1111 ``extensions-builtin/Lora/network.py``
(``weight_decompose`` / ``apply_weight_decompose``), which differ (see :func:`_dora`).
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


def _col_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm per input column, shaped [1, in, 1...] (how A1111 and ComfyUI's input-axis DoRA normalise)."""
    return (
        weight.transpose(0, 1)
        .reshape(weight.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(weight.shape[1], *[1] * (weight.dim() - 1))
        .transpose(0, 1)
    )


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm per output row, shaped [out, 1...] (LyCORIS wd_on_out, PEFT)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(-1, *[1] * (weight.dim() - 1))


def _dora(weight: torch.Tensor, update: torch.Tensor, dora_scale: torch.Tensor, app: str) -> torch.Tensor:
    """The DoRA weight ``W'`` from the base ``weight``, the scaled LoRA ``update`` and the file's ``dora_scale``.

    - ``lycoris``: LyCORIS's ``apply_weight_decompose`` for the layout the file has (``wd_on_out``
      for ``[out, 1]``, the input-axis norm for ``[1, in]``), on ``V = W + update``.
    - ``comfyui``: ``comfy/weight_adapter/base.py`` ``weight_decompose`` (v0.3.77 on): the axis is
      ``dora_scale.shape[0] == out``; the output-axis branch divides by the norm of ``W`` (not of
      ``V``; ComfyUI PR #15458 would change that), the input-axis one by ``V``'s.
    - ``a1111``: ``extensions-builtin/Lora/network.py`` ``apply_weight_decompose`` (after PR #16151,
      alpha inside): always the input-axis norm of ``V``, whatever ``dora_scale``'s shape.
    """
    eps = torch.finfo(torch.float32).eps
    merged = weight + update
    scale = dora_scale.float()
    output_axis = scale.shape[0] == weight.shape[0] and scale.shape[0] != 1
    if app == "lycoris":
        norm = (_row_norm(merged) if output_axis else _col_norm(merged)) + eps
    elif app == "comfyui":
        norm = (_row_norm(weight) if output_axis else _col_norm(merged)) + eps
    elif app == "a1111":
        norm = _col_norm(merged)
    else:
        raise ValueError(app)
    return merged * (scale / norm)


@torch.no_grad()
def patched_weight(weight: torch.Tensor, tensors: dict, strength: float = 1.0, app: str = "lycoris") -> torch.Tensor:
    """The weight an app uses for one module: ``W + strength * (W' - W)`` (``app``: see :func:`_dora`)."""
    if "lora_up.weight" in tensors:
        diff, scale = _lora(tensors, weight.shape)
    elif "hada_w1_a" in tensors:
        diff, scale = _loha(tensors, weight.shape)
    else:
        diff, scale = _lokr(tensors, weight.shape)
    base = weight.float()
    merged = base + scale * diff
    if "dora_scale" in tensors:
        merged = _dora(base, scale * diff, tensors["dora_scale"], app)
    return (base + strength * (merged - base)).to(weight.dtype)


@torch.no_grad()
def apply_kohya_file(pipe, family: str, path, strength: float = 1.0, app: str = "lycoris"):
    """Patch ``pipe``'s UNet/text encoders in place the way A1111/ComfyUI apply a kohya file (DoRA: as ``app``)."""
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
        layer.weight.copy_(patched_weight(layer.weight, tensors, strength, app))
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
