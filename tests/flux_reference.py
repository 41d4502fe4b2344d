"""Ground truth for Flux tests: fixed transformer inputs, and files as other trainers write them.

``comfy_merge`` applies a kohya file to BFL-layout weights the way ComfyUI's ``comfy/lora.py``
does for Flux (keys ``lora_unet_`` + the BFL module path, ``W += alpha / rank * up @ down`` on
the fused weight): a test reference, written from reading that code, not a copy of it.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lorafit.families.flux import image_ids, pack_latents


def flux_inputs(transformer, seed: int = 1, size: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    latents = torch.randn(2, config.in_channels // 4, size, size, generator=generator)
    text = torch.randn(2, 7, config.joint_attention_dim, generator=generator)
    inputs = dict(
        hidden_states=pack_latents(latents),
        timestep=torch.tensor([0.9, 0.3]),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
        encoder_hidden_states=text,
        txt_ids=torch.zeros(7, 3),
        img_ids=image_ids(size, size, "cpu", torch.float32),
        return_dict=False,
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([1.0, 3.5])
    return inputs


@torch.no_grad()
def flux_output(transformer, seed: int = 1) -> torch.Tensor:
    return transformer(**flux_inputs(transformer, seed))[0]


@torch.no_grad()
def comfy_merge(bfl: dict[str, torch.Tensor], kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL weights with a kohya Flux file merged in as ComfyUI merges it (see module docstring)."""
    by_stem = {
        "lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key for key in bfl if key.endswith(".weight")
    }
    merged = dict(bfl)
    stems = {key.split(".")[0] for key in kohya}
    for stem in stems:
        target = by_stem[stem]  # KeyError = a stem ComfyUI would not map: the test fails on it
        down, up = kohya[f"{stem}.lora_down.weight"].float(), kohya[f"{stem}.lora_up.weight"].float()
        alpha = float(kohya.get(f"{stem}.alpha", torch.tensor(float(down.shape[0]))))
        merged[target] = merged[target] + alpha / down.shape[0] * (up @ down)
    return merged


def write_lora_file(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
