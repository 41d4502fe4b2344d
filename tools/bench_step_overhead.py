"""What `lorafit fit` adds to a training step beyond the model's own work, on the toy demo.

    python tools/bench_step_overhead.py [--config configs/demo.yaml] [--steps 30] [--repeats 2]

One process, interleaved repeats: (a) `lorafit fit --config CONFIG` for ``--steps`` steps with its
real callbacks (metrics, NaN/Inf guard, export, checkpoint, progress bar, logger; sample rounds off,
the reference draws none), and (b) a plain PyTorch loop doing the same work on the same prepared
shards: webdataset reads and decodes the same samples, the same tokenizer, text encoder (with its
LoRA when the config trains it), VAE and UNet with the same LoRA (the module lorafit just trained,
so targets, rank and dtypes are the same), the DDPM loss, gradient clipping at the config's value and
the same AdamW. The time of a step is from one batch's start to the next one's, data fetch included;
the figure is the median over steps (epoch ends, with their exports, are reported apart).

It also times `lorafit fit`'s start-up in a fresh process: from launch to the first batch's start,
beside `python -c "import torch"` for scale.

Prints one Markdown block for benchmarks/RESULTS.md ("Per-step overhead on the toy demo").

    python tools/bench_step_overhead.py --startup-only [--repeats 5]

only times the start-up, with a breakdown: fresh processes that import one more of what `lorafit fit`
imports each (torch, torch._dynamo, transformers' auto models, Lightning, lorafit's modules, diffusers'
pipeline and PEFT), and the moments of real `lorafit fit` launches (callbacks built = imports + CLI
parse + instantiation, trainer setup, model loaded, train start, first batch); wall seconds from launch
and the process's CPU seconds, medians over interleaved launches.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402


class StepClock(pl.Callback):
    """Batch start times of a `lorafit fit` run, and the trained module and data module it used."""

    runs: ClassVar[list[StepClock]] = []

    def __init__(self, first_batch_file: str | None = None):
        self.starts: list[float] = []
        self.epoch_ends: list[int] = []
        self.first_batch_file = first_batch_file
        self.module = self.datamodule = None
        # Moments of the start-up: wall clock (time.time(), comparable with the launching process's) and
        # this process's CPU seconds since it started (less sensitive to other jobs on a shared machine).
        self.moments: dict[str, tuple[float, float]] = {}
        self._mark("callbacks built")
        StepClock.runs.append(self)

    def _mark(self, moment: str) -> None:
        self.moments[moment] = (time.time(), time.process_time())

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._mark("trainer setup")  # after the data module's setup, before configure_model

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark("model loaded")  # configure_model (the base + LoRA) has run

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark("train start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        if self.first_batch_file and len(self.starts) == 1:
            self._mark("first batch")
            Path(self.first_batch_file).write_text(json.dumps(self.moments))
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append(len(self.starts))

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        self.module, self.datamodule = pl_module, trainer.datamodule


def _step_times(starts: list[float], epoch_ends: list[int], warmup: int) -> tuple[list[float], list[float]]:
    """Per-step seconds after ``warmup`` steps: (steps inside an epoch, steps that crossed an epoch end)."""
    inside, crossing = [], []
    for i in range(warmup, len(starts) - 1):
        (crossing if i + 1 in epoch_ends else inside).append(starts[i + 1] - starts[i])
    return inside, crossing


def run_lorafit(config: str, data_dir: str, root: str, steps: int) -> StepClock:
    from lorafit.cli.main import main

    flags = ["--trainer.default_root_dir", root, "--trainer.max_steps", str(steps), "--samples.prompts", "[]"]
    flags += ["--data.train_dir", data_dir, "--trainer.callbacks+=bench_step_overhead.StepClock"]
    main(["fit", "--config", config, *flags])
    import bench_step_overhead  # the CLI built the callback from this module, not from __main__

    return bench_step_overhead.StepClock.runs[-1]


def _plain_batches(shards: list[str], batch_size: int, resolution: int, seed: int):
    """The same shards through webdataset alone: decode, to [-1, 1] tensors, shuffle, batch."""
    import numpy as np
    import webdataset as wds

    def to_sample(sample):
        image = next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg", "webp"))
        image = image.convert("RGB").resize((resolution, resolution))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(127.5).sub(1)
        return pixels, sample["txt"]

    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).shuffle(200, rng=None).decode("pil")
    dataset = dataset.map(to_sample).batched(batch_size, partial=False)
    torch.manual_seed(seed)
    while True:
        for pixels, captions in dataset:
            yield pixels, list(captions)


def run_plain(clock: StepClock, steps: int, clip: float | None) -> list[float]:
    """The reference loop on ``clock``'s module (its LoRA already attached) for ``steps`` steps."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from lorafit.training.optim import build_optimizer, optimizer_kwargs

    module, datamodule = clock.module, clock.datamodule
    base = module.base
    unet, vae, encoder, tokenizer = base.denoiser, base.vae, base.text_encoders[0], base.tokenizers[0]
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    source = Path(datamodule._sources("train")[0])
    shards = sorted(str(p) for p in source.glob("*.tar"))
    opt = module.optimizer_config
    groups = [
        {"name": name, "lr": rate, "params": [p for p in part.parameters() if p.requires_grad]}
        for name, rate, part in (("unet", opt.learning_rate, unet), ("text_encoder", opt.learning_rate, encoder))
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = optimizer_kwargs(opt.name, optimizer_args=opt.args)
    optimizer = build_optimizer(opt.name, groups, opt.learning_rate, kwargs)
    params = [p for g in groups for p in g["params"]]
    batches = _plain_batches(shards, datamodule.batch_size, datamodule.resolution, seed=0)
    unet.train()
    starts = []
    for _ in range(steps + 1):
        starts.append(time.perf_counter())
        pixels, captions = next(batches)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        hidden = encoder(torch.tensor(ids.input_ids))[0]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [b - a for a, b in itertools.pairwise(starts)]


def _fit_command(config: str, data_dir: str, root: str, marker: Path) -> list[str]:
    clock = {"class_path": "bench_step_overhead.StepClock", "init_args": {"first_batch_file": str(marker)}}
    command = [sys.executable, "-m", "lorafit.cli", "fit", "--config", config, "--data.train_dir", data_dir]
    return (
        command
        + ["--trainer.default_root_dir", root, "--samples.prompts", "[]"]
        + [f"--trainer.callbacks+={json.dumps(clock)}"]
    )


def _bench_env() -> dict[str, str]:
    """The child's path: this tools folder (for StepClock), then the caller's PYTHONPATH, then this checkout."""
    path = [str(ROOT / "tools"), *filter(None, [os.environ.get("PYTHONPATH")]), str(ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _launch_seconds(command: list[str]) -> float:
    launched = time.time()
    subprocess.run(command, env=_bench_env(), check=True, capture_output=True)
    return time.time() - launched


def _import_seconds(code: str) -> tuple[float, float]:
    """Launch of a fresh ``python -c CODE`` to the end of CODE (the interpreter's exit left out): wall
    seconds, and the CPU seconds the process had used by then."""
    launched = time.time()
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, time; print(json.dumps([time.time(), time.process_time()]))"],
        env=_bench_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return wall - launched, cpu


def fit_startup(config: str, data_dir: str) -> dict[str, tuple[float, float]]:
    """One fresh `lorafit fit`: (wall seconds from launch, CPU seconds of the process) at each start-up
    moment, up to the first batch's start."""
    with tempfile.TemporaryDirectory() as root:
        marker = Path(root) / "first-batch"
        launched = time.time()
        done = subprocess.run(
            _fit_command(config, data_dir, str(Path(root) / "run"), marker), env=_bench_env(), capture_output=True
        )
        if done.returncode != 0 or not marker.is_file():
            raise SystemExit(f"lorafit fit failed (exit {done.returncode}):\n{done.stderr.decode()[-3000:]}")
        return {name: (wall - launched, cpu) for name, (wall, cpu) in json.loads(marker.read_text()).items()}


def startup_seconds(config: str, data_dir: str) -> tuple[float, float]:
    """(launch of `lorafit fit` to its first batch, launch of `python -c "import torch"` to exit)."""
    fit = fit_startup(config, data_dir)["first batch"][0]
    return fit, _launch_seconds([sys.executable, "-c", "import torch"])


# Fresh processes, each importing one more of what `lorafit fit` imports, in its order (the differences
# between consecutive ones are each step's cost), timed from launch to the end of the imports.
# bitsandbytes is kept out as the CLI keeps it out (lorafit/cli/startup.py).
_STARTUP_STAGES = {
    "python": "pass",
    "import torch": "import torch",
    "+ torch._dynamo (diffusers' utils.torch_utils and Lightning's fabric.wrappers import it)": "import torch._dynamo",
    "+ transformers' auto models (torchmetrics' BERTScore, at Lightning's import)": (
        "import torch._dynamo; from transformers import AutoModel, AutoTokenizer"
    ),
    "import lightning.pytorch (all of the above)": "import lightning.pytorch",
    "+ lorafit fit's own modules": (
        "from lorafit.cli.startup import block_optional_imports; block_optional_imports(); "
        "from lorafit.cli.lightning_cli import _build_cli_class; _build_cli_class('fit')"
    ),
    "+ diffusers' SD pipeline, models and PEFT (at the model load)": (
        "from lorafit.cli.startup import block_optional_imports; block_optional_imports(); "
        "from lorafit.cli.lightning_cli import _build_cli_class; _build_cli_class('fit'); "
        "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel"
    ),
    # The floor of any SD trainer built on diffusers (its own example scripts too): the pipeline's
    # classes, the CLIP text encoder and PEFT, without Lightning or lorafit.
    "floor: diffusers' SD pipeline + transformers' CLIP + PEFT alone (no Lightning, no lorafit)": (
        "from lorafit.cli.startup import block_optional_imports; block_optional_imports(); "
        "from diffusers import StableDiffusionPipeline; from transformers import CLIPTextModel; import peft"
    ),
}


def startup_breakdown(config: str, data_dir: str, repeats: int) -> dict[str, tuple[float, float]]:
    """Medians over ``repeats`` interleaved launches of (wall seconds from launch, CPU seconds of the
    process): where `lorafit fit`'s seconds before the first step go."""
    samples: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for name, code in _STARTUP_STAGES.items():
            samples.setdefault(name, []).append(_import_seconds(code))
        for name, seconds in fit_startup(config, data_dir).items():
            samples.setdefault(f"`lorafit fit`: {name}", []).append(seconds)
    return {
        name: (round(statistics.median(w for w, _ in values), 2), round(statistics.median(c for _, c in values), 2))
        for name, values in samples.items()
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=45, help="steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each measurement")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved lorafit/plain measurements")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="only time `lorafit fit`'s start-up, with a breakdown (medians over --repeats launches)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.startup_only:
        return startup_only(args.config, args.repeats)
    import yaml

    clip = (yaml.safe_load(Path(args.config).read_text()).get("trainer") or {}).get("gradient_clip_val")
    lorafit_steps, lorafit_crossing, plain_steps = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy-data"
        from lorafit.cli.main import main as lorafit

        lorafit(["toy-data", str(data)])
        for repeat in range(args.repeats):
            clock = run_lorafit(args.config, str(data), str(Path(tmp) / f"run{repeat}"), args.warmup + args.steps)
            inside, crossing = _step_times(clock.starts, clock.epoch_ends, args.warmup)
            lorafit_steps += inside
            lorafit_crossing += crossing
            plain_steps += run_plain(clock, args.warmup + args.steps, clip)[args.warmup :]
        fit_start, torch_start = startup_seconds(args.config, str(data))
    ours, theirs = statistics.median(lorafit_steps), statistics.median(plain_steps)
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "config": os.path.relpath(args.config, ROOT),
        "threads": args.threads,
        "steps": len(lorafit_steps),
        "lorafit_step_ms": round(ours * 1000, 1),
        "plain_step_ms": round(theirs * 1000, 1),
        "ratio": round(ours / theirs, 3),
        "lorafit_mean_ms": round(statistics.mean(lorafit_steps) * 1000, 1),
        "plain_mean_ms": round(statistics.mean(plain_steps) * 1000, 1),
        "epoch_end_step_ms": [round(s * 1000) for s in lorafit_crossing],
        "fit_startup_s": round(fit_start, 2),
        "import_torch_s": round(torch_start, 2),
    }
    print(json.dumps(row))
    print(
        f"\n| date | machine | median step: lorafit | plain loop | lorafit / plain | steps crossing an epoch end "
        f"| `lorafit fit` launch -> first step | `import torch` |\n|---|---|---|---|---|---|---|---|\n"
        f"| {row['date']} | {row['machine']} | {row['lorafit_step_ms']} ms | {row['plain_step_ms']} ms | "
        f"**{row['ratio']}** | {', '.join(map(str, row['epoch_end_step_ms'])) or '-'} ms | {row['fit_startup_s']} s "
        f"| {row['import_torch_s']} s |"
    )
    return 0


def startup_only(config: str, repeats: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "toy-data"
        from lorafit.cli.main import main as lorafit

        lorafit(["toy-data", str(data)])
        breakdown = startup_breakdown(config, str(data), repeats)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine, "repeats": repeats, **breakdown}))
    print(f"\n{machine}, medians of {repeats} launches each\n\n| moment | wall s from launch | CPU s |\n|---|---|---|")
    for name, (wall, cpu) in breakdown.items():
        print(f"| {name} | {wall} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
