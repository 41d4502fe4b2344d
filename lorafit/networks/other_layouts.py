"""Key layouts other tools write that ComfyUI reads, renamed to the kohya layout lorafit's reader knows.

ComfyUI's "generic" layout names a module by its path in ComfyUI's own state dict, with PEFT's or
kohya's part names (``comfy/lora.py``: ``model_lora_keys_unet`` / ``model_lora_keys_clip``):

- the denoiser: ``diffusion_model.`` + the original model's path (BFL's for Flux, LDM/SGM's for the
  UNets): ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``;
- text encoders: ``text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.`` + the transformers path:
  ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight``.

Each key becomes the kohya key of the same module (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
``lora_te1_text_model_...``), whose names the base model's table resolves, fused modules included.
diffusers' Flux reader does the same renaming (``_convert_kohya_flux_lora_to_diffusers``).
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError

_PART_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_PARTS = ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
_DENOISER = "diffusion_model."
_TEXT = "text_encoders."
# ComfyUI's text-encoder names -> diffusers component (CLIP-L is the first encoder in SD1, SDXL and Flux).
_TEXT_COMPONENTS = {
    "clip_l": "text_encoder",
    "clip_h": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5xxl": "text_encoder_2",
}


def is_generic_layout(tensors: dict) -> bool:
    return bool(tensors) and all(key.startswith((_DENOISER, _TEXT)) for key in tensors)


def generic_to_kohya(tensors: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """Rename a generic-layout file's keys to kohya keys for ``family``; other files pass unchanged."""
    if not is_generic_layout(tensors):
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        part = next((p for p in _PARTS if key.endswith("." + p)), None)
        if part is None:
            raise LorafitError(f"key {key} is no LoRA part lorafit reads ({', '.join(_PARTS)})")
        path = key[: -len(part) - 1]
        if path.startswith(_DENOISER):
            stem = "lora_unet_" + path.removeprefix(_DENOISER)
        else:
            encoder, _, rest = path.removeprefix(_TEXT).partition(".")
            component = _TEXT_COMPONENTS.get(encoder)
            prefix = family.kohya_prefixes.get(component) if component else None
            if prefix is None or not rest.startswith("transformer."):
                raise LorafitError(f"key {key}: {family.title} has no text encoder {encoder!r}")
            stem = f"{prefix}_" + rest.removeprefix("transformer.")
        renamed[f"{stem.replace('.', '_')}.{_PART_NAMES.get(part, part)}"] = tensor
    return renamed
