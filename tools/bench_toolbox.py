"""Peak memory and time of the LoRA toolbox on a full-size SDXL (random weights), on the CPU.

    python tools/bench_toolbox.py --work /tmp/lorafit-toolbox-bench --write benchmarks/toolbox-memory.md

1. Writes a full-size SDXL base (the real configs: UNet 2.6 B parameters, CLIP-L, OpenCLIP bigG,
   the VAE) as a diffusers directory in float16 with random weights: every component is built on
   the meta device and each tensor is made on the CPU only when the streaming writer reaches it,
   so the 6.9 GB model never exists in memory.
2. A random rank-32 LoRA on kohya's targets (attention, MLP, proj_in/out, both text encoders).
3. Runs each verb as ``lorafit`` does from the shell, one process per step, and samples its memory
   every 0.1 s from ``/proc``: the peak resident set (``VmHWM``) and the peak of anonymous memory
   (``RssAnon``: what the process allocated; the rest of the resident set is the model files' pages,
   mapped by safetensors, which the kernel drops under memory pressure).

Steps: resize the LoRA; merge it into the directory (streamed) and into a single file (a change of
layout: diffusers builds the model in memory once); merge into that single file (streamed); extract
it back from base and merged directories at rank 32 (``--preset attn-mlp``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "lorafit" / "bench" / "configs"
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
BIG_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)


def _text_encoder(cls_name: str, settings: dict):
    import transformers

    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **settings)
    with torch.device("meta"):
        return getattr(transformers, cls_name)(config)


def write_full_sdxl(out: Path, seed: int = 0) -> Path:
    """A full-size SDXL directory, float16, random weights, written tensor by tensor (see docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lorafit.families.tiny import build_clip_tokenizer
    from lorafit.networks.toolbox.safetensors_stream import Planned, write_streamed

    if (out / "model_index.json").exists():
        return out
    generator = torch.Generator().manual_seed(seed)

    def planned(tensor: torch.Tensor) -> Planned:
        shape = tuple(tensor.shape)

        def make() -> torch.Tensor:
            return (torch.randn(shape, generator=generator) * 0.02).half()

        return Planned(shape, torch.float16, make)

    parts = {}
    for name, cls, file in (("unet", UNet2DConditionModel, "sdxl_unet.json"), ("vae", AutoencoderKL, "sdxl_vae.json")):
        config = {k: v for k, v in json.loads((CONFIGS / file).read_text()).items() if not k.startswith("_source")}
        with torch.device("meta"):
            parts[name] = cls.from_config(config)
    parts["text_encoder"] = _text_encoder("CLIPTextModel", CLIP_L)
    parts["text_encoder_2"] = _text_encoder("CLIPTextModelWithProjection", BIG_G)
    for name, model in parts.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_config(folder) if hasattr(model, "save_config") else model.config.save_pretrained(folder)
        weights = "model.safetensors" if name.startswith("text") else "diffusion_pytorch_model.safetensors"
        write_streamed(folder / weights, {k: planned(t) for k, t in model.state_dict().items()}, {"format": "pt"})
    for name in ("tokenizer", "tokenizer_2"):
        build_clip_tokenizer(pad_token="<|endoftext|>" if name == "tokenizer" else "!").save_pretrained(out / name)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "sdxl_scheduler.json", out / "scheduler" / "scheduler_config.json")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_random_lora(base: Path, out: Path, rank: int = 32) -> Path:
    """A random rank-``rank`` LoRA on kohya's SDXL targets (attn-mlp, text encoders' attention and MLP)."""
    from lorafit.families.loading import model_skeleton
    from lorafit.families.registry import get_family
    from lorafit.networks.adapters import DEFAULT_TEXT_ENCODER_TARGETS
    from lorafit.networks.files import save_kohya
    from lorafit.networks.lora_weights import LoraModuleWeights
    from lorafit.networks.presets import select_modules

    family, components = model_skeleton(str(base))
    spec = get_family(family)
    generator = torch.Generator().manual_seed(1)
    weights = {}
    for component, model in components.items():
        if component == "unet":
            targets = select_modules(model, spec.preset_modules(model, "attn-mlp"))
        else:
            targets = select_modules(model, DEFAULT_TEXT_ENCODER_TARGETS)
        modules = {}
        for name, module in targets.items():
            out_features, inputs = module.weight.shape[0], module.weight.shape[1:]
            down = torch.randn(rank, *inputs, generator=generator) * 0.01
            up_shape = (out_features, rank, 1, 1) if len(inputs) == 3 else (out_features, rank)
            modules[name] = LoraModuleWeights(down, torch.randn(up_shape, generator=generator) * 0.01, float(rank))
        weights[component] = modules
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    return save_kohya(out, family, weights, components["unet"].config, meta, torch.float16)


def _status(pid: int) -> dict[str, int]:
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def measured(args: list[str], log: Path) -> dict:
    """Run ``lorafit ARGS`` in its own process; its wall time, peak RSS and peak anonymous memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.time()
    with log.open("a") as handle:
        handle.write(f"\n$ lorafit {' '.join(args)}\n")
        handle.flush()
        process = subprocess.Popen([sys.executable, "-m", "lorafit.cli", *args], stdout=handle, stderr=handle, env=env)
        peaks = {"VmHWM": 0, "RssAnon": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                status = _status(process.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, code, usage = os.wait4(process.pid, 0)
        stop.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"lorafit {' '.join(args)} failed; see {log}")
    return {
        "seconds": time.time() - start,
        "peak_rss": max(peaks["VmHWM"], usage.ru_maxrss * 1024),
        "peak_anonymous": peaks["RssAnon"],
    }


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/lorafit-toolbox-bench", help="folder for the models (~28 GB of disk)")
    parser.add_argument("--write", help="also write the report to this markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument("--device", default="cpu", help="where extract's SVDs run: cpu or cuda")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    started = time.time()
    base = write_full_sdxl(work / "sdxl-base")
    built = time.time() - started
    lora = write_random_lora(base, work / "lora-r32.safetensors")
    for stale in (
        "lora-r16.safetensors",
        "merged-dir",
        "merged.safetensors",
        "merged-twice.safetensors",
        "x.safetensors",
    ):
        path = work / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    steps = [
        (
            "resize the LoRA, rank 32 -> 16",
            ["resize", str(lora), "--rank", "16", "--out", str(work / "lora-r16.safetensors")],
        ),
        (
            "merge into the directory -> directory (streamed)",
            ["merge", str(lora), "--into", str(base), "--out", str(work / "merged-dir")],
        ),
        (
            "merge into the directory -> single file (layout change, in memory)",
            ["merge", str(lora), "--into", str(base), "--out", str(work / "merged.safetensors")],
        ),
        (
            "merge into the single file -> single file (streamed)",
            [
                "merge",
                f"{lora}:-1",
                "--into",
                str(work / "merged.safetensors"),
                "--single_file_config",
                str(base),
                "--out",
                str(work / "merged-twice.safetensors"),
            ],
        ),
        (
            "extract from base and merged directories, rank 32, attn-mlp",
            [
                "extract",
                "--base",
                str(base),
                "--tuned",
                str(work / "merged-dir"),
                "--rank",
                "32",
                "--preset",
                "attn-mlp",
                "--out",
                str(work / "x.safetensors"),
                "--report",
                str(work / "extract.csv"),
                "--device",
                args.device,
            ],
        ),
    ]
    rows = []
    for title, command in steps:
        result = measured(command, log)
        rows.append(
            f"| {title} | {result['seconds']:.0f} s | {gib(result['peak_rss'])} | {gib(result['peak_anonymous'])} |"
        )
        print(rows[-1], flush=True)
    sizes = {name: sum(p.stat().st_size for p in (work / name).rglob("*") if p.is_file()) for name in ("sdxl-base",)}
    out = [
        "# LoRA toolbox on a full-size SDXL: peak memory and time",
        "",
        (
            f"Date: {datetime.date.today()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with "
            f"other jobs, {gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} RAM, no GPU. "
            f"torch {torch.__version__}."
        ),
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
        (
            f"The base: SDXL's real configs with random float16 weights, {gib(sizes['sdxl-base'])} on disk, written "
            f"tensor by tensor from meta-device models in {built:.0f} s. The LoRA: random, rank 32 on kohya's targets "
            "(attention, MLP and proj_in/out of the UNet's transformer blocks, both text encoders' attention and MLP). "
            "Each step is one `lorafit` process; memory sampled every 0.1 s from /proc."
        ),
        "",
        "| step | time | peak resident (VmHWM) | peak anonymous (RssAnon) |",
        "|---|---|---|---|",
        *rows,
        "",
        (
            "Peak resident memory counts the model files' pages that safetensors maps while it reads them (the "
            "kernel drops those first under memory pressure); anonymous memory is what the process itself holds. "
            "The streamed steps hold a few tensors at a time; the layout change builds the model once, in the "
            "dtype it is stored in."
        ),
        "",
    ]
    if args.write:
        Path(args.write).write_text("\n".join(out))
    print("\n".join(out))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
