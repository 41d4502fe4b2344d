"""Count the FLOPs of a denoiser forward and of a LoRA training step with ``torch.utils.flop_counter``.

Counting runs on the ``meta`` device: shapes only, no weights allocated, so the full-size SDXL
or Flux count takes seconds to a minute on any machine and the same number serves every device's MFU.

Why meta and not the device the step runs on: ``FlopCounterMode`` has formulas for CUDA's fused
attention kernels (flash, efficient, cuDNN) but not for the CPU's
(``_scaled_dot_product_flash_attention_for_cpu``), which it would count as 0. On meta, SDPA falls
back to its math form (two ``bmm``), whose FLOPs equal the fused kernels' formulas; so the count
is the same whatever backend the timed step used.

The denoiser is called through its family's ``predict`` (lorafit's training code path: SDXL's
added conditioning, Flux's packing, position ids and guidance), at timestep/sigma 0: no FLOP
depends on the value.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lorafit.bench.architectures import architecture, base_model, latent_shape, synthetic_batch
from lorafit.families.family import TextOptions
from lorafit.families.registry import get_family


def _conditioning(batch: dict) -> dict:
    return {key: batch[key] for key in ("prompt_embeds", "pooled_prompt_embeds") if key in batch}


def _timesteps(family, batch_size: int) -> torch.Tensor:
    # DDPM families take integer timesteps, flow families sigmas in (0, 1].
    dtype = torch.float32 if family.objective == "flow" else torch.long
    return torch.zeros(batch_size, dtype=dtype, device="meta")


def forward_flops(name: str, resolution: int, batch_size: int = 1, width_divisor: int = 1) -> int:
    """FLOPs of one frozen denoiser forward (no LoRA) at ``resolution``², with its text conditioning."""
    base = base_model(name, width_divisor, device="meta", with_vae=False)
    family = get_family(architecture(name).family)
    batch = synthetic_batch(name, resolution, batch_size, width_divisor, device="meta")
    noisy = torch.zeros(latent_shape(name, resolution, batch_size), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.predict(base, noisy, _timesteps(family, batch_size), _conditioning(batch), batch, TextOptions())
    return counter.get_total_flops()


def step_flops(
    module, resolution: int, batch_size: int, cached_latents: bool = True, gradient_checkpointing: bool | None = None
) -> int:
    """FLOPs of one training step of ``module`` (a ``BenchLoraModule`` built on ``meta``).

    Counts what the GPU computes: the VAE encode when latents are not cached, the denoiser forward
    through the family's ``predict`` (the training code path, LoRA included) and the backward pass
    that reaches the LoRA weights, with the recomputed forward when gradient checkpointing is on.
    Noise, loss and optimizer are elementwise and count as 0 FLOPs, as in every MFU figure.
    """
    module.configure_model()
    module.to("meta")  # no data moves; makes module.device meta, where predict() puts the SDXL time ids
    denoiser = module.denoiser
    if gradient_checkpointing is not None:
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        else:
            denoiser.disable_gradient_checkpointing()
    denoiser.train()  # diffusers checkpoints only in training mode
    name = module.bench_family
    tokens = module.conditioning_config.max_sequence_length
    batch = synthetic_batch(
        name, resolution, batch_size, module.width_divisor, cached_latents, device="meta", text_tokens=tokens
    )
    with FlopCounterMode(display=False) as counter:
        if not cached_latents:
            with torch.no_grad():
                module.vae.encode(batch["pixel_values"])
        noisy = torch.zeros(latent_shape(name, resolution, batch_size), device="meta")
        prediction = module.spec.predict(
            module.base,
            noisy,
            _timesteps(module.spec, batch_size),
            _conditioning(batch),
            batch,
            module.conditioning_config,
        )
        prediction.float().square().mean().backward()
    return counter.get_total_flops()
