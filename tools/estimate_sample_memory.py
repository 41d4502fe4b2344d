#!/usr/bin/env python
"""ESTIMATE the peak GPU memory of a round of training samples (SDXL, low-VRAM recipe), before and
after lorafit moves the training-only state off the device for the round (lorafit/callbacks/sample_round.py).

    python tools/estimate_sample_memory.py                       # SDXL 1024², the low-VRAM recipe
    python tools/estimate_sample_memory.py --width-divisor 8 --resolution 256   # CPU-sized check

Counted on fake tensors with PyTorch's MemTracker and the flash-attention stand-in, as the training
estimate is (tools/devbench/memory.py, docs/memory-estimate.md):

- one denoising step of the sampler: the UNet (bf16 weights, the recipe's LoRA) on a CFG batch of 2,
  no gradient;
- the VAE decoding one latent (bf16, as the SDXL pipeline does for bf16 weights);
- the text encoders' weights (bf16; CLIP-L and OpenCLIP bigG, their published parameter counts);
- the training state alive at the end of an epoch: the LoRA's gradients and the optimizer state, from
  two training steps of the same setting.

Rows: everything on the device at once (what sampling did before), and lorafit's round (optimizer
state and gradients on the host; text encoders on the device only while the prompts are encoded,
the VAE while images are drawn and decoded). Like the training estimate it leaves out the CUDA
context, cuDNN/cuBLAS workspaces and allocator fragmentation (docs/memory-estimate.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/devbench: the memory estimate (not in the wheel)
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch
from devbench import memory
from torch._subclasses.fake_tensor import FakeTensorMode

from lorafit.bench.architectures import CONTEXT, POOLED_WIDTH, build_vae
from lorafit.bench.settings import LOW_VRAM

# Published text encoders of stabilityai/stable-diffusion-xl-base-1.0 (text_encoder: CLIP-L,
# text_encoder_2: OpenCLIP bigG with projection), parameters.
TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840
GIB = 2**30


def _tracked_peak(run) -> int:
    """Peak bytes of every tensor alive while ``run()`` runs (weights tracked by the caller included)."""
    tracker = memory.LoraMemTracker()
    with tracker, torch.no_grad():
        run(tracker)
    return sum(memory._snapshot(tracker, "peak").values())  # the bench's own breakdown helper


def unet_step_peak(setting, fake: FakeTensorMode) -> tuple[int, int]:
    """(weights of the UNet + LoRA, peak of one CFG denoising step) in bytes."""
    module, _ = memory.build_estimate_module(setting, fake)
    unet = module.unet.eval()
    latent, (tokens, width) = setting.resolution // 8, CONTEXT[setting.family]
    d = setting.width_divisor
    dtype = next(unet.parameters()).dtype
    with fake:
        sample = torch.randn(2, 4, latent, latent, dtype=dtype)
        text = torch.randn(2, tokens, width // d, dtype=dtype)
        extra = {}
        if setting.family == "sdxl":
            side = float(setting.resolution)
            extra["added_cond_kwargs"] = {
                "text_embeds": torch.randn(2, POOLED_WIDTH // d, dtype=dtype),
                "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=dtype),
            }

        def step(tracker):
            tracker.track_external(unet, sample, text)
            unet(sample, torch.tensor([500, 500]), text, **extra)

        peak = _tracked_peak(step)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    return weights, peak


def vae_decode_peak(setting, fake: FakeTensorMode) -> tuple[int, int]:
    """(VAE weights, peak of decoding one latent) in bytes."""
    vae = build_vae(setting.family, setting.width_divisor, device="meta", dtype=torch.bfloat16)
    memory._to_fake(vae, fake)
    latent = setting.resolution // 8
    with fake:
        latents = torch.randn(1, 4, latent, latent, dtype=torch.bfloat16)

        def decode(tracker):
            tracker.track_external(vae, latents)
            vae.decode(latents)

        peak = _tracked_peak(decode)
    return sum(p.numel() * p.element_size() for p in vae.parameters()), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=LOW_VRAM.resolution)
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--optimizer", default=LOW_VRAM.optimizer, help="adafactor (the recipe) or adamw8bit")
    args = parser.parse_args()
    setting = dataclasses.replace(
        LOW_VRAM, resolution=args.resolution, width_divisor=args.width_divisor, optimizer=args.optimizer
    )
    training = memory.estimate_step_memory(setting)
    state = training["breakdown"]["gradients"] + training["breakdown"]["optimizer_state"]
    unet_weights, unet_peak = unet_step_peak(setting, FakeTensorMode(allow_non_fake_inputs=True))
    vae_weights, vae_peak = vae_decode_peak(setting, FakeTensorMode(allow_non_fake_inputs=True))
    text_weights = TEXT_ENCODER_PARAMS * 2 // args.width_divisor**2  # bf16; widths shrink both matrix sides
    # Each peak above already holds its own model's weights; the others add on top.
    draw, decode = unet_peak + vae_weights, vae_peak + unet_weights
    before = state + text_weights + max(draw, decode)
    after = max(draw, decode, unet_weights + text_weights)
    print(f"setting: {setting.label}")
    print("| part | GiB |\n|---|---|")
    for name, value in (
        ("UNet + LoRA weights (bf16 / fp32)", unet_weights),
        ("UNet denoising step, CFG batch 2: peak incl. weights", unet_peak),
        ("VAE weights (bf16)", vae_weights),
        ("VAE decode of one latent: peak incl. weights", vae_peak),
        ("text encoders' weights (bf16)", text_weights),
        (f"LoRA gradients + {args.optimizer} state", state),
        ("**round before: everything on the device**", before),
        ("**lorafit's round: state on the host, one frozen part at a time**", after),
    ):
        print(f"| {name} | {value / GIB:.2f} |")


if __name__ == "__main__":
    main()
