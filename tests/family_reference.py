"""Ground truth for the transformer families added after Flux (Qwen-Image, Z-Image, FLUX.2 [klein], Chroma,
SD3.5):
fixed denoiser inputs, and their weights under the names of the files ComfyUI and BFL ship.

``denoiser_output`` calls the family's own ``predict`` on fixed latents, sigmas and conditioning (two
captions of different lengths, so the mask path runs), without any text encoder: the output depends
on the transformer's weights only, which is what a reloaded LoRA must reproduce.
"""

from __future__ import annotations

import torch

from lorafit.families.family import BaseModel, TextOptions
from lorafit.families.registry import get_family

NEW_FAMILIES = ("qwen-image", "z-image", "flux2-klein", "chroma", "sd3")


def _text_width(family: str, config) -> int:
    return config.cap_feat_dim if family == "z-image" else config.joint_attention_dim


def fixed_inputs(family: str, transformer, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(noisy latents [2, C, 8, 8], sigmas, conditioning) for ``transformer`` of ``family``."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    # Qwen-Image, Chroma: 2x2 packed; FLUX.2: 128 patchified channels = 4 x 32; Z-Image, SD3: unpacked.
    channels = config.in_channels if family in ("z-image", "sd3") else config.in_channels // 4
    latents = torch.randn(2, channels, 8, 8, generator=generator)
    embeds = torch.randn(2, 7, _text_width(family, config), generator=generator)
    conditioning = {"prompt_embeds": embeds}
    if "pooled_prompt_embeds" in get_family(family).conditioning_keys:  # SD3's CLIP-L + CLIP-G vectors
        conditioning["pooled_prompt_embeds"] = torch.randn(2, config.pooled_projection_dim, generator=generator)
    if "prompt_embeds_mask" in get_family(family).conditioning_keys:
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, 4:] = False  # the second caption is shorter: padded, as a batch of real captions is
        conditioning["prompt_embeds_mask"] = mask
    return latents, torch.tensor([0.9, 0.3]), conditioning


@torch.no_grad()
def denoiser_output(family: str, transformer, seed: int = 1) -> torch.Tensor:
    latents, sigmas, conditioning = fixed_inputs(family, transformer, seed)
    base = BaseModel(family, "flow", transformer, vae=None)
    return get_family(family).predict(base, latents, sigmas, conditioning, {}, TextOptions())


def native_state_dict(family: str, transformer) -> dict[str, torch.Tensor]:
    """The transformer's weights as the family's ComfyUI/BFL files hold them."""
    if family == "z-image":
        from lorafit.families.z_image_layout import native_state_dict as z_image_native

        return z_image_native(transformer)
    if family == "flux2-klein":
        from lorafit.families.flux2_layout import bfl_state_dict

        return bfl_state_dict(transformer)
    if family == "chroma":
        from lorafit.families.chroma_layout import original_state_dict

        return original_state_dict(transformer)
    if family == "sd3":
        from lorafit.families.sd3_layout import original_state_dict as mmdit_state_dict

        return mmdit_state_dict(transformer)
    return dict(transformer.state_dict())  # Qwen-Image's files use diffusers' names


def diffusers_from_native(family: str, native: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """diffusers' own single-file reader for the family: native names back to diffusers' names. Chroma's
    reader hard-codes the released width, so the tiny model goes through lorafit's table (``config``),
    which test_families checks against diffusers' reader on that width."""
    from diffusers.loaders import single_file_utils as files

    if family == "chroma":
        from lorafit.families.chroma_layout import diffusers_state_dict

        return diffusers_state_dict(dict(native), config)

    convert = {
        "z-image": files.convert_z_image_transformer_checkpoint_to_diffusers,
        "flux2-klein": files.convert_flux2_transformer_checkpoint_to_diffusers,
        "sd3": files.convert_sd3_transformer_checkpoint_to_diffusers,
    }.get(family)
    return convert(dict(native)) if convert else dict(native)
