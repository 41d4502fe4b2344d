"""The real SD1.5, SDXL and FLUX.1 architectures, built from their published configs with random weights.

Speed and FLOPs depend on the architecture, not on the weights, so the benchmark needs no
download: ``configs/*.json`` hold the diffusers ``config.json`` of the denoiser (UNet or
transformer), VAE and scheduler of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0,
black-forest-labs/FLUX.1-dev and FLUX.1-schnell. The parameter count of every full-size build is
checked against the published model's, so an edited config cannot pass for the real one.

``width_divisor`` shrinks every channel width (never the depth or the block layout) so the same
code path runs on a CPU in seconds; 1 is the real model. Flux keeps its 128-wide attention heads
(and so its rotary-embedding layout) and divides the number of heads.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import BaseModel

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class Architecture:
    """One benchmarked model: its config files, published sizes and the conditioning it is fed.

    ``denoiser_params`` and ``vae_params`` are the published models' parameter counts:
    SD1.5/SDXL from their diffusers ``*.safetensors``; FLUX.1 from the Hub's safetensors metadata of
    black-forest-labs/FLUX.1-dev (11,901,408,320 BF16 parameters; its transformer's
    ``diffusion_pytorch_model.safetensors.index.json`` total size, 23,802,816,640 bytes, is 2 bytes
    each) and FLUX.1-schnell (23,782,357,120 bytes = 11,891,178,560 parameters: [dev] less its
    guidance embedder), and the 244 tensors / 83,819,683 values of their shared ``ae.safetensors``.
    """

    family: str  # lorafit's family (lorafit.families.registry)
    files: str  # prefix of configs/<files>_<part>.json
    denoiser_part: str  # "unet" or "transformer"
    denoiser_params: int
    vae_params: int
    text_tokens: int  # CLIP context (77) or T5 sequence length (Flux.1's pipeline default)
    text_width: int
    pooled_width: int | None  # SDXL's OpenCLIP pooled vector, Flux's CLIP-L pooled vector
    vae_file: str = ""  # a VAE config shared by several architectures; empty: <files>_vae.json


ARCHITECTURES = {
    "sd1": Architecture("sd1", "sd15", "unet", 859_520_964, 83_653_863, 77, 768, None),
    "sdxl": Architecture("sdxl", "sdxl", "unet", 2_567_463_684, 83_653_863, 77, 2048, 1280),
    "flux": Architecture("flux", "flux_dev", "transformer", 11_901_408_320, 83_819_683, 512, 4096, 768, "flux_vae"),
    "flux-schnell": Architecture(
        "flux", "flux_schnell", "transformer", 11_891_178_560, 83_819_683, 256, 4096, 768, "flux_vae"
    ),
}
# The UNet families' CLIP context (tokens, width) and SDXL's pooled width, by the names
# tools/estimate_sample_memory.py reads.
CONTEXT = {name: (a.text_tokens, a.text_width) for name, a in ARCHITECTURES.items() if a.denoiser_part == "unet"}
POOLED_WIDTH = ARCHITECTURES["sdxl"].pooled_width
# Width divisors keep every width a whole number and divisible by the head counts: 320, 768, 1280,
# 2048 and 256 share only powers of two, SD1.5's 8 heads need 320 / d to divide by 8, and Flux's 24
# heads, 4096-wide T5 and 768-wide pooled CLIP vector divide by each of them.
VALID_DIVISORS = (1, 2, 4, 8)


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise LorafitError(f"bench: family {name!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def published_config(name: str, part: str) -> dict:
    """The published diffusers config of ``part`` (``unet``/``transformer``, ``vae``, ``scheduler``),
    without its ``_`` keys."""
    arch = architecture(name)
    stem = arch.vae_file if part == "vae" and arch.vae_file else f"{arch.files}_{part}"
    config = json.loads((CONFIG_DIR / f"{stem}.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _check_divisor(width_divisor: int) -> None:
    if width_divisor not in VALID_DIVISORS:
        raise LorafitError(f"bench: width divisor {width_divisor} is not one of {VALID_DIVISORS}")


def denoiser_config(name: str, width_divisor: int = 1) -> dict:
    """The denoiser's config, every channel width divided by ``width_divisor`` (1 = the published model)."""
    _check_divisor(width_divisor)
    arch = architecture(name)
    config = published_config(name, arch.denoiser_part)
    d = width_divisor
    if d == 1:
        return config
    if arch.denoiser_part == "transformer":
        config["num_attention_heads"] //= d  # inner width 3072 / d; heads stay 128 wide
        config["joint_attention_dim"] //= d
        config["pooled_projection_dim"] //= d
        return config
    config["block_out_channels"] = [c // d for c in config["block_out_channels"]]
    config["cross_attention_dim"] //= d
    # GroupNorm groups must divide the narrowest width (40 at d=8); 8 groups do for every valid d.
    config["norm_num_groups"] = 8
    if arch.pooled_width:  # SDXL's added conditioning: the pooled text vector and six size/crop ids
        config["addition_time_embed_dim"] //= d
        config["projection_class_embeddings_input_dim"] = arch.pooled_width // d + 6 * config["addition_time_embed_dim"]
    return config


def vae_config(name: str, width_divisor: int = 1) -> dict:
    _check_divisor(width_divisor)
    config = published_config(name, "vae")
    if width_divisor > 1:
        config["block_out_channels"] = [c // width_divisor for c in config["block_out_channels"]]
        config["norm_num_groups"] = 8
    return config


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _checked(module: torch.nn.Module, name: str, part: str, published: int, width_divisor: int):
    if width_divisor == 1 and count_params(module) != published:
        raise LorafitError(
            f"bench: the {name} {part} built from {CONFIG_DIR} has {count_params(module):,} parameters, "
            f"the published one {published:,}; its config file was changed"
        )
    return module


@contextlib.contextmanager
def _building(device: str, dtype: torch.dtype):
    """Create modules on ``device`` directly in ``dtype``: no float32 copy first (full-size Flux is
    48 GB in float32), and no ``.to(dtype)``, on which diffusers warns even when nothing is wrong."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_denoiser(
    name: str, width_divisor: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A randomly initialised UNet or transformer of ``name``; on ``meta`` it allocates nothing (FLOP counting)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    arch = architecture(name)
    cls = FluxTransformer2DModel if arch.denoiser_part == "transformer" else UNet2DConditionModel
    with _building(device, dtype):
        denoiser = cls.from_config(denoiser_config(name, width_divisor))
    _checked(denoiser, name, arch.denoiser_part, arch.denoiser_params, width_divisor)
    return denoiser.requires_grad_(False).eval()


def build_vae(
    name: str, width_divisor: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with _building(device, dtype):
        vae = AutoencoderKL.from_config(vae_config(name, width_divisor))
    _checked(vae, name, "VAE", architecture(name).vae_params, width_divisor)
    return vae.requires_grad_(False).eval()


class VaeSettings(torch.nn.Module):
    """The VAE's config without its weights, for steps on cached latents.

    Training on cached latents reads only the VAE's scaling and shift factors and downscale factor;
    the bench leaves the weights out so that such a step's memory is the memory it needs (see
    docs/performance.md: ``lorafit fit`` keeps the VAE in host memory when the data is cached).
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
    name: str,
    width_divisor: int = 1,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_vae: bool = True,
    quantization: str = "none",
) -> BaseModel:
    """A lorafit ``BaseModel`` of random weights: denoiser, VAE (or its settings only) and the scheduler config.

    No text encoders: the bench trains on cached text embeddings, as the performance recipe does.
    ``quantization="nf4"`` stores the denoiser's Linears in bitsandbytes NF4 (:mod:`lorafit.bench.nf4`),
    computing in ``dtype``, as ``model.quantization: nf4`` loads it.
    """
    arch = architecture(name)
    denoiser = build_denoiser(name, width_divisor, device, dtype)
    if quantization == "nf4":
        from lorafit.bench.nf4 import quantize_nf4

        quantize_nf4(denoiser, dtype, device)
    elif quantization != "none":
        raise LorafitError(f"bench --quantization: {quantization!r} is not one of none, nf4")
    vae = (
        build_vae(name, width_divisor, device, dtype)
        if with_vae
        else VaeSettings(vae_config(name, width_divisor), dtype)
    )
    scheduler = published_config(name, "scheduler")
    return BaseModel(
        family=arch.family,
        prediction_type="flow" if arch.denoiser_part == "transformer" else "epsilon",
        denoiser=denoiser,
        vae=vae,
        text_encoders=[],
        tokenizers=[],
        scheduler_config=scheduler,
        source=f"bench:{name}",
        compute_dtype=dtype if quantization != "none" else None,
    )


def latent_shape(name: str, resolution: int, batch_size: int) -> tuple[int, int, int, int]:
    """[B, C, h, w] of the VAE latents of ``resolution``² images (8x downscale in every family here)."""
    channels = published_config(name, "vae")["latent_channels"]
    return batch_size, channels, resolution // 8, resolution // 8


def synthetic_batch(
    name: str,
    resolution: int,
    batch_size: int,
    width_divisor: int = 1,
    cached_latents: bool = True,
    device: str = "cpu",
    generator: torch.Generator | None = None,
    text_tokens: int | None = None,
) -> dict:
    """A batch in lorafit's batch contract (see ``lorafit.training.step``), random contents.

    Text embeddings are always cached (``prompt_embeds``: CLIP hidden states, or Flux's T5 sequence,
    ``text_tokens`` long or by default 512 tokens for [dev] and 256 for [schnell];
    ``pooled_prompt_embeds``: SDXL's and Flux's pooled vector); images are cached VAE moments or pixels.
    """
    arch = architecture(name)
    multiple = 16 if arch.denoiser_part == "transformer" else 8  # Flux packs 2x2 latent patches
    if resolution % multiple:
        raise LorafitError(f"bench: resolution {resolution} is not a multiple of {multiple} for {name}")
    b, side = batch_size, resolution
    _, channels, h, w = latent_shape(name, resolution, batch_size)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    batch = {
        "captions": ["a benchmark image"] * b,
        "original_size": torch.full((b, 2), side, dtype=torch.long, device=device),
        "crop_top_left": torch.zeros((b, 2), dtype=torch.long, device=device),
        "prompt_embeds": randn(b, text_tokens or arch.text_tokens, arch.text_width // width_divisor),
    }
    if arch.pooled_width:
        batch["pooled_prompt_embeds"] = randn(b, arch.pooled_width // width_divisor)
    if cached_latents:
        batch["latent_moments"] = randn(b, 2 * channels, h, w)  # mean and log-variance of the latent channels
    else:
        batch["pixel_values"] = randn(b, 3, side, side).clamp(-1, 1)
    return batch
