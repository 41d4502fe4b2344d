#!/usr/bin/env python
"""ESTIMATE the peak GPU memory of a transformer family's training step at full size, on fake tensors.

The same method as ``tools/bench.py --estimate-memory`` (docs/memory-estimate.md): lorafit's own
``LoraDiffusionModule`` step (LoRA attached by ``configure_model``, the family's ``predict``, backward,
the optimizer from ``configure_optimizers``, two steps) runs on ``FakeTensorMode`` tensors under
PyTorch's ``MemTracker``, with CUDA's autocast lists. Only the base differs: the transformer is built on
``meta`` from the released model's config (its diffusers class's defaults: checked by parameter count),
the VAE is its settings only and the text encoder is absent, as in ``lorafit fit`` on cached latents
and text embeddings. Quantized storage cannot run on fake tensors (bitsandbytes quantizes real tensors
on a GPU; diffusers' fp8 layerwise casting swaps parameters the tracker holds), so those rows are
derived from the bf16 one: the frozen weights' bytes replaced by NF4's (0.5 byte per weight + one fp32
absmax per 64 weights) or fp8's (1 byte), plus the largest Linear upcast to bf16 while it multiplies.
Derived rows say so.

    python tools/estimate_family_memory.py --family qwen-image --resolution 512,768,1024 --derive
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

# family -> (transformer class, published parameter count, VAE settings, text width, latent channels)
RELEASED = {
    "qwen-image": (
        "QwenImageTransformer2DModel",
        20_430_401_088,
        {"z_dim": 16, "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 16, "latents_std": [1] * 16},
        3584,
        16,
    ),
}
GIB = 2**30


def _module(family: str, rank: int, preset: str, checkpointing: bool):
    import diffusers

    from lorafit.bench.architectures import VaeSettings
    from lorafit.families.family import BaseModel
    from lorafit.training.module import LoraDiffusionModule

    class_name, published, vae_config, _, _ = RELEASED[family]

    class EstimateModule(LoraDiffusionModule):
        def load_base(self) -> BaseModel:
            with torch.device("meta"):
                transformer = getattr(diffusers, class_name)()  # the released config is the class's default
            count = sum(p.numel() for p in transformer.parameters())
            if count != published:
                raise SystemExit(f"{class_name} has {count:,} parameters, the released model {published:,}")
            transformer.to(torch.bfloat16).requires_grad_(False)
            return BaseModel(
                family=family,
                prediction_type="flow",
                denoiser=transformer,
                vae=VaeSettings(vae_config, torch.bfloat16),
                scheduler_config={},
            )

    return EstimateModule(
        model=f"bench/{family}",
        weight_dtype="bfloat16",
        network={"rank": rank, "alpha": float(rank), "preset": preset},
        optimizer={"name": "AdamW8bit", "learning_rate": 1e-4},
        memory={"gradient_checkpointing": checkpointing},
    )


def _batch(family: str, resolution: int, tokens: int) -> dict:
    _, _, _, width, channels = RELEASED[family]
    latent = resolution // 8
    return {
        "captions": ["an estimate"],
        "original_size": torch.full((1, 2), resolution),
        "crop_top_left": torch.zeros(1, 2, dtype=torch.long),
        "latent_moments": torch.randn(1, 2 * channels, latent, latent),
        "prompt_embeds": torch.randn(1, tokens, width),  # one caption: no padding, so no mask
    }


def estimate(family: str, resolution: int, rank: int, preset: str, tokens: int, checkpointing: bool):
    """Peak bytes of two training steps, with the breakdown at the peak (see module docstring)."""
    import contextlib
    import types

    from devbench.cuda_autocast import cuda_autocast_policy
    from devbench.memory import LoraMemTracker, _outside, _snapshot, _to_fake
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        module = _module(family, rank, preset, checkpointing)
        with _outside(mode):
            module.configure_model()
        _to_fake(module, mode)
        module.train()
        module._trainer = types.SimpleNamespace(estimated_stepping_batches=1000)
        with _outside(mode):
            optimizer = module.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        module._trainer = None
        batch = _batch(family, resolution, tokens)
        tracker = LoraMemTracker()
        tracker.track_external(module, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
        with contextlib.ExitStack() as stack:
            stack.enter_context(cuda_autocast_policy())
            stack.enter_context(tracker)
            for step in range(2):
                if step:
                    tracker.reset_mod_stats()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = module.denoising_loss(batch, torch.Generator().manual_seed(step))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                del loss
                optimizer.step()
        peak = _snapshot(tracker, "peak")
    frozen = sum(p.numel() for p in module.denoiser.parameters() if not p.requires_grad)
    largest = max(m.weight.numel() for m in module.denoiser.modules() if isinstance(m, torch.nn.Linear))
    return {
        "family": family,
        "resolution": resolution,
        "quantization": "none",
        "rank": rank,
        "preset": preset,
        "caption_tokens": tokens,
        "gradient_checkpointing": checkpointing,
        "peak_bytes": sum(peak.values()),
        "breakdown": peak,
        "frozen_params": frozen,
        "largest_linear": largest,
        "lora_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "derived": False,
    }


def derive(row: dict, quantization: str) -> dict:
    """The bf16 row with the frozen weights stored as ``nf4`` or ``fp8`` (see module docstring): derived."""
    frozen = row["frozen_params"]
    stored = {"nf4": frozen // 2 + 4 * (frozen // 64), "fp8": frozen}[quantization]
    breakdown = dict(row["breakdown"], parameters=row["breakdown"]["parameters"] - 2 * frozen + stored)
    upcast = 2 * row["largest_linear"]  # one Linear's weight in bf16 while it multiplies
    peak = sum(breakdown.values()) + upcast
    return dict(row, quantization=quantization, peak_bytes=peak, breakdown=breakdown, derived=True)


def _report(row: dict, output: str | None) -> None:
    kinds = ", ".join(f"{k} {v / GIB:.2f}" for k, v in row["breakdown"].items() if v)
    label = f"{row['family']} {row['resolution']}px {row['quantization']}{' (derived)' if row['derived'] else ''}"
    lora = row["lora_params"] / 1e6
    print(f"{label}: peak {row['peak_bytes'] / GIB:.2f} GiB ({kinds}); LoRA {lora:.1f} M", flush=True)
    if output:
        with open(output, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen-image", choices=sorted(RELEASED))
    parser.add_argument("--resolution", default="1024", help="comma list of image sides")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--preset", default="attn-mlp")
    parser.add_argument("--caption-tokens", type=int, default=256, help="text tokens per caption")
    parser.add_argument("--gradient-checkpointing", default="true", choices=("true", "false"))
    parser.add_argument("--derive", action="store_true", help="also print the NF4 and fp8 rows derived from bf16")
    parser.add_argument("--output", help="append one JSON line per row to this file")
    args = parser.parse_args(argv)
    for resolution in (int(r) for r in args.resolution.split(",")):
        row = estimate(
            args.family, resolution, args.rank, args.preset, args.caption_tokens, args.gradient_checkpointing == "true"
        )
        for result in [row, derive(row, "nf4"), derive(row, "fp8")] if args.derive else [row]:
            _report(result, args.output)
    return 0


if __name__ == "__main__":
    from lorafit.cli.startup import quiet_known_notices

    quiet_known_notices()  # bitsandbytes' offline kernel-fetch notices on CPUs, filtered by text as the CLI does
    sys.exit(main())
