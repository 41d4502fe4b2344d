"""The real SD1.5 and SDXL architectures, built from their published configs with random weights.

Speed and FLOPs depend on the architecture, not on the weights, so the benchmark needs no
download: ``configs/*.json`` hold the diffusers ``config.json`` of the UNet, VAE and scheduler of
runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0. The parameter count of
every full-size build is checked against the published model's, so an edited config cannot pass
for the real one.

``width_divisor`` shrinks every channel width (never the depth or the block layout) so the same
code path runs on a CPU in seconds; 1 is the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import BaseModel

CONFIG_DIR = Path(__file__).with_name("configs")
# family -> config file prefix; lorafit's family names (sd1 = SD1.x, sdxl).
CONFIG_PREFIX = {"sd1": "sd15", "sdxl": "sdxl"}
# Parameter counts of the published UNets (diffusers, unet/diffusion_pytorch_model.safetensors).
PUBLISHED_UNET_PARAMS = {"sd1": 859_520_964, "sdxl": 2_567_463_684}
# Published VAE: 83,653,863 parameters in both families (same architecture, other weights).
PUBLISHED_VAE_PARAMS = 83_653_863
# Text-conditioning shapes the UNet receives: CLIP context length and width, SDXL's pooled width.
CONTEXT = {"sd1": (77, 768), "sdxl": (77, 2048)}
POOLED_WIDTH = 1280
# Width divisors keep every width a whole number and divisible by the head counts: 320, 768, 1280,
# 2048 and 256 share only powers of two, and SD1.5's 8 heads need 320 / d to divide by 8.
VALID_DIVISORS = (1, 2, 4, 8)


def published_config(family: str, part: str) -> dict:
    """The published diffusers config of ``part`` (``unet``, ``vae``, ``scheduler``), without ``_`` keys."""
    if family not in CONFIG_PREFIX:
        raise LorafitError(f"bench: family {family!r} is not one of {', '.join(CONFIG_PREFIX)}")
    config = json.loads((CONFIG_DIR / f"{CONFIG_PREFIX[family]}_{part}.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _check_divisor(width_divisor: int) -> None:
    if width_divisor not in VALID_DIVISORS:
        raise LorafitError(f"bench: width divisor {width_divisor} is not one of {VALID_DIVISORS}")


def unet_config(family: str, width_divisor: int = 1) -> dict:
    """The UNet config, every channel width divided by ``width_divisor`` (1 = the published model)."""
    _check_divisor(width_divisor)
    config = published_config(family, "unet")
    if width_divisor == 1:
        return config
    d = width_divisor
    config["block_out_channels"] = [c // d for c in config["block_out_channels"]]
    config["cross_attention_dim"] //= d
    # GroupNorm groups must divide the narrowest width (40 at d=8); 8 groups do for every valid d.
    config["norm_num_groups"] = 8 if d > 1 else config["norm_num_groups"]
    if family == "sdxl":
        config["addition_time_embed_dim"] //= d
        config["projection_class_embeddings_input_dim"] = POOLED_WIDTH // d + 6 * config["addition_time_embed_dim"]
    return config


def vae_config(family: str, width_divisor: int = 1) -> dict:
    _check_divisor(width_divisor)
    config = published_config(family, "vae")
    if width_divisor > 1:
        config["block_out_channels"] = [c // width_divisor for c in config["block_out_channels"]]
        config["norm_num_groups"] = 8
    return config


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(
    family: str, width_divisor: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A randomly initialised UNet of ``family``; on ``meta`` it allocates nothing (FLOP counting)."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(family, width_divisor))
    if width_divisor == 1 and count_params(unet) != PUBLISHED_UNET_PARAMS[family]:
        raise LorafitError(
            f"bench: the {family} UNet built from {CONFIG_DIR} has {count_params(unet):,} parameters, "
            f"the published one {PUBLISHED_UNET_PARAMS[family]:,}; its config file was changed"
        )
    if dtype != torch.float32:  # diffusers warns on any .to(dtype)
        unet.to(dtype)
    return unet.requires_grad_(False).eval()


def build_vae(
    family: str, width_divisor: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_config(family, width_divisor))
    if width_divisor == 1 and count_params(vae) != PUBLISHED_VAE_PARAMS:
        raise LorafitError(
            f"bench: the {family} VAE has {count_params(vae):,} parameters, the published one "
            f"{PUBLISHED_VAE_PARAMS:,}; its config file was changed"
        )
    if dtype != torch.float32:
        vae.to(dtype)
    return vae.requires_grad_(False).eval()


class VaeSettings(torch.nn.Module):
    """The VAE's config without its weights, for steps on cached latents.

    Training on cached latents reads only the VAE's scaling factor and downscale factor; the bench
    leaves the weights out so that such a step's memory is the memory it needs (see
    docs/performance.md: lorafit itself keeps a loaded VAE on the device).
    """

    def __init__(self, config: dict, dtype: torch.dtype):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict({"shift_factor": None, **config})
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(self, *args, **kwargs):
        return self

    def encode(self, *args, **kwargs):
        raise LorafitError("bench: this step was set up for cached latents (latent_moments) but got pixels")


def base_model(
    family: str, width_divisor: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32, with_vae: bool = True
) -> BaseModel:
    """A lorafit ``BaseModel`` of random weights: UNet, VAE (or its settings only) and the scheduler config.

    No text encoders: the bench trains on cached text embeddings, as the performance recipe does.
    """
    unet = build_unet(family, width_divisor, device, dtype)
    vae = (
        build_vae(family, width_divisor, device, dtype)
        if with_vae
        else VaeSettings(vae_config(family, width_divisor), dtype)
    )
    return BaseModel(
        family=family,
        prediction_type="epsilon",
        denoiser=unet,
        vae=vae,
        text_encoders=[],
        tokenizers=[],
        scheduler_config=published_config(family, "scheduler"),
        source=f"bench:{family}",
    )


def synthetic_batch(
    family: str,
    resolution: int,
    batch_size: int,
    width_divisor: int = 1,
    cached_latents: bool = True,
    device: str = "cpu",
    generator: torch.Generator | None = None,
) -> dict:
    """A batch in lorafit's batch contract (see ``LoraDiffusionModule.denoising_loss``), random contents.

    Text embeddings are always cached (``prompt_embeds``); images are cached VAE moments or pixels.
    """
    if resolution % 8:
        raise LorafitError(f"bench: resolution {resolution} is not a multiple of 8")
    b, side, latent = batch_size, resolution, resolution // 8
    tokens, width = CONTEXT[family]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    batch = {
        "captions": ["a benchmark image"] * b,
        "original_size": torch.full((b, 2), side, dtype=torch.long, device=device),
        "crop_top_left": torch.zeros((b, 2), dtype=torch.long, device=device),
        "prompt_embeds": randn(b, tokens, width // width_divisor),
    }
    if family == "sdxl":
        batch["pooled_prompt_embeds"] = randn(b, POOLED_WIDTH // width_divisor)
    if cached_latents:
        batch["latent_moments"] = randn(b, 8, latent, latent)  # mean and log-variance of 4 latent channels
    else:
        batch["pixel_values"] = randn(b, 3, side, side).clamp(-1, 1)
    return batch
