"""Count the FLOPs of a UNet forward and of a LoRA training step with ``torch.utils.flop_counter``.

Counting runs on the ``meta`` device: shapes only, no weights allocated, so the full-size SDXL
count takes seconds on any machine and the same number serves every device's MFU.

Why meta and not the device the step runs on: ``FlopCounterMode`` has formulas for CUDA's fused
attention kernels (flash, efficient, cuDNN) but not for the CPU's
(``_scaled_dot_product_flash_attention_for_cpu``), which it would count as 0. On meta, SDPA falls
back to its math form (two ``bmm``), whose FLOPs equal the fused kernels' formulas; so the count
is the same whatever backend the timed step used.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from lorafit.bench.architectures import build_unet, synthetic_batch


def _conditioning(batch: dict) -> dict:
    return {key: batch[key] for key in ("prompt_embeds", "pooled_prompt_embeds") if key in batch}


def forward_flops(family: str, resolution: int, batch_size: int = 1, width_divisor: int = 1) -> int:
    """FLOPs of one frozen UNet forward (no LoRA) at ``resolution``², with text and SDXL added conditioning."""
    unet = build_unet(family, width_divisor, device="meta")
    batch = synthetic_batch(family, resolution, batch_size, width_divisor, device="meta")
    latent = resolution // 8
    noisy = torch.zeros(batch_size, 4, latent, latent, device="meta")
    timesteps = torch.zeros(batch_size, dtype=torch.long, device="meta")
    added = None
    if family == "sdxl":
        added = {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": torch.zeros(batch_size, 6, device="meta")}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs=added)
    return counter.get_total_flops()


def step_flops(
    module, resolution: int, batch_size: int, cached_latents: bool = True, gradient_checkpointing: bool | None = None
) -> int:
    """FLOPs of one training step of ``module`` (a ``BenchLoraModule`` built on ``meta``).

    Counts what the GPU computes: the VAE encode when latents are not cached, the UNet forward
    through ``module.predict`` (the training code path, LoRA included) and the backward pass that
    reaches the LoRA weights, with the recomputed forward when gradient checkpointing is on. Noise,
    loss and optimizer are elementwise and count as 0 FLOPs, as in every MFU figure.
    """
    module.configure_model()
    module.to("meta")  # no data moves; makes module.device meta, where predict() puts the SDXL time ids
    unet = module.unet
    if gradient_checkpointing is not None:
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in training mode
    batch = synthetic_batch(
        module.bench_family, resolution, batch_size, module.width_divisor, cached_latents, device="meta"
    )
    latent = resolution // 8
    timesteps = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        if not cached_latents:
            with torch.no_grad():
                module.vae.encode(batch["pixel_values"])
        noisy = torch.zeros(batch_size, 4, latent, latent, device="meta")
        prediction = module.spec.predict(
            module.base, noisy, timesteps, _conditioning(batch), batch, module.conditioning_config
        )
        prediction.float().square().mean().backward()
    return counter.get_total_flops()
