"""Benchmark the memory/time knobs: gradient checkpointing on/off x AdamW / AdamW8bit / Adafactor.

For each UNet (the tiny SDXL one the tests use, and a mid-size SD1.5-layout UNet with random
weights) and each setting, it runs LoRA training steps the way LoraDiffusionModule does (lorafit's
own ``add_lora``, ``build_optimizer``, diffusers' gradient checkpointing, MSE on noised latents) and
reports

- step time: median process CPU time and wall time of ``--steps`` steps after one warm-up step
  (forward, backward, optimizer step), with ``--threads`` torch threads, and the optimizer step's
  CPU time alone. On a shared machine the CPU time is the steadier number: other jobs stretch the
  wall time, not the work done;
- peak memory: weights (frozen base + LoRA) + optimizer state (sizes of the live tensors) + the
  step's working peak: the maximum of the bytes allocated minus freed during one step (activations,
  gradients, temporaries), from torch's profiler (``profile_memory``) events summed in time order.
  Process RSS is not used: glibc keeps freed pages, so RSS peaks blur what a step needs.

VAE and text encoders are left out (they are frozen and run without grad, so the knobs measured
here do not touch them); the UNet gets random latents and text embeddings.

    python tools/bench_recipe.py --out benchmarks/recipe.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafit.networks.adapters import DEFAULT_UNET_TARGETS, add_lora, lora_config
from lorafit.training.optim import build_optimizer, optimizer_kwargs

OPTIMIZERS = {
    "AdamW": {},
    "AdamW8bit": {},
    "Adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
}


def tiny_unet():
    from lorafit.families.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl").unet, 8


def mid_unet():
    """SD1.5's layout at ~2/3 width and one layer per block: 373M parameters, random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(256, 512, 1024, 1024),
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return unet, 16


MODELS = {"tiny": tiny_unet, "mid": mid_unet}


def unet_inputs(unet, latent_size: int, batch: int) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    latents = torch.randn(batch, config.in_channels, latent_size, latent_size, generator=generator)
    hidden = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch),
        }
    return (latents, hidden), kwargs


def make_step(unet, optimizer, latents, hidden, kwargs):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(1)

    optimizer_seconds = []

    def step():
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden, **kwargs).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        start = time.process_time()
        optimizer.step()
        optimizer_seconds.append(time.process_time() - start)
        optimizer.zero_grad(set_to_none=True)

    step.optimizer_seconds = optimizer_seconds
    return step


def working_peak_mib(step) -> float:
    """Peak of the bytes a step allocates on top of what already lives (weights, optimizer state).

    Every allocation and free of CPU tensors during one step, as torch's profiler records them
    (each op's own net allocation, and frees outside ops), summed in time order.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def tensor_mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20


def run_one(
    base_unet, latent_size: int, batch: int, rank: int, optimizer_name: str, checkpointing: bool, steps: int
) -> dict:
    unet = copy.deepcopy(base_unet)
    unet.requires_grad_(False)
    add_lora(unet, lora_config(rank, rank, DEFAULT_UNET_TARGETS, "bench"), "bench")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"name": "unet", "lr": 1e-4, "params": params}]
    kwargs = optimizer_kwargs(optimizer_name, optimizer_args=OPTIMIZERS[optimizer_name])
    optimizer = build_optimizer(optimizer_name, groups, 1e-4, kwargs)
    (latents, hidden), extra = unet_inputs(unet, latent_size, batch)
    step = make_step(unet, optimizer, latents, hidden, extra)
    step()  # warm-up; creates the optimizer state
    times, cpu_times = [], []
    step.optimizer_seconds.clear()
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    optimizer_ms = 1000 * statistics.median(step.optimizer_seconds)
    working = working_peak_mib(step)
    weights = tensor_mib(unet.state_dict().values())  # frozen base + LoRA
    state = tensor_mib(t for per_param in optimizer.state.values() for t in per_param.values())
    return {
        "optimizer": optimizer_name,
        "checkpointing": checkpointing,
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "optimizer_ms": optimizer_ms,
        "lora_params": sum(p.numel() for p in params),
        "weights_mib": weights,
        "state_mib": state,
        "working_mib": working,
        "total": weights + state + working,
    }


def markdown(results: dict[str, list[dict]], settings: dict, command: str) -> str:
    import bitsandbytes
    import diffusers
    import transformers

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    method = (
        "- method: step time = median over the timed steps (after one warm-up step) of the process CPU time "
        "(with one thread: the work done, little affected by other jobs on the machine) and of the wall time "
        "(affected by them); the optimizer step's CPU time alone in its own column. Peak memory = weights "
        "(frozen base + LoRA) + optimizer state (sizes of the live tensors) + working peak = the maximum over "
        "one step of bytes allocated minus freed (activations, gradients, temporaries), from torch.profiler's "
        "profile_memory events summed in time order. CPU tensor memory is what these knobs change; on a GPU "
        "the same parts dominate VRAM."
    )
    lines = [
        "# Benchmark: memory and time knobs of the training recipe",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        (
            f"- device: CPU ({cpu}), {settings['threads']} torch thread(s), {os.cpu_count()} cores shared with other "
            f"jobs (load average {settings['load']} at the end of the run: timings are noisy)"
        ),
        (
            f"- versions: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
            f"{transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}"
        ),
        f"- command: `{command}`",
        method,
        "",
    ]
    for name, rows in results.items():
        info = settings["models"][name]
        lines += [
            f"## {name}: {info}",
            "",
            (
                "| optimizer | grad ckpt | step CPU s | step wall s | optimizer step CPU ms | peak MiB | "
                "weights MiB | optimizer state MiB | working peak MiB |"
            ),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['optimizer']} | {'on' if r['checkpointing'] else 'off'} | {r['step_cpu_s']:.3f} | "
                f"{r['step_s']:.3f} | {r['optimizer_ms']:.1f} | "
                f"{r['total']:.1f} | {r['weights_mib']:.1f} | {r['state_mib']:.2f} | {r['working_mib']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    results, settings = {}, {"threads": args.threads, "models": {}}
    for name in args.models:
        unet, latent_size = MODELS[name]()
        millions = sum(p.numel() for p in unet.parameters()) / 1e6
        rows = []
        for checkpointing in (False, True):
            for optimizer_name in OPTIMIZERS:
                started = time.time()
                row = run_one(unet, latent_size, args.batch, args.rank, optimizer_name, checkpointing, args.steps)
                rows.append(row)
                print(
                    f"{name} {optimizer_name} ckpt={checkpointing}: {row['step_cpu_s']:.3f} CPU s/step, peak "
                    f"{row['total']:.1f} MiB, state {row['state_mib']:.2f} MiB ({time.time() - started:.0f} s)",
                    flush=True,
                )
        results[name] = rows
        settings["models"][name] = (
            f"{millions:.0f}M-parameter UNet, {latent_size}x{latent_size} latents "
            f"({latent_size * 8} px), batch {args.batch}, LoRA rank {args.rank} on attention "
            f"({rows[0]['lora_params'] / 1e6:.2f}M LoRA parameters)"
        )
    settings["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python tools/bench_recipe.py " + " ".join(sys.argv[1:])
    report = markdown(results, settings, command.strip())
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    from lorafit.cli.startup import quiet_known_notices

    quiet_known_notices()  # bitsandbytes' offline kernel-fetch notices on CPUs, filtered by text as the CLI does
    main()
