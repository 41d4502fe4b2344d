"""``lorafit generate``: images from a base model with any number of LoRAs, each at its own strength.

    lorafit generate --model sdxl-base --prompt "ohwx dog in a park" \\
        --lora runs/dog/lora/dog-epoch-004.safetensors:0.8 --lora style.safetensors:0.4 \\
        --seed 1 --seed 2 --steps 30 --cfg 7 --hires_scale 1.5 --hires_denoise 0.4

LoRA files are read by :func:`lorafit.load_lora`: kohya/LyCORIS files from any trainer and every
format lorafit writes. Each PNG carries its settings as A1111-style ``parameters`` text.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import load_base_model, resolve_model_source
from lorafit.inference.png_info import AppliedLora, a1111_parameters, save_png
from lorafit.inference.prompts import parse_prompt_line, read_prompt_file
from lorafit.inference.render import HiresFix, Renderer
from lorafit.inference.samplers import canonical_sampler

log = logging.getLogger("lorafit.generate")

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


def parse_lora_spec(spec: str, key: str = "--lora") -> AppliedLora:
    """``path.safetensors:0.8`` -> (path, 0.8); a bare path means strength 1.

    Only a trailing ``:<number>`` is a strength, so ``C:\\loras\\x.safetensors`` stays a path.
    """
    path, strength = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        with contextlib.suppress(ValueError):
            path, strength = head, float(tail)
    if not Path(path).expanduser().is_file():
        raise LorafitError(f"{key} {spec}: LoRA file {path} does not exist")
    return AppliedLora(str(Path(path).expanduser()), strength)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_renderer(
    model: str,
    device: str = "auto",
    dtype: Dtype = "auto",
    clip_skip: int = 1,
    single_file_config: str | None = None,
    max_token_length: int | None = None,
) -> Renderer:
    """Load ``model`` (diffusers dir, hub id or single file) and wrap it in a :class:`Renderer` on ``device``."""
    from diffusers.utils import logging as diffusers_logging

    resolve_model_source(model, key="--model")
    # One "Loading pipeline components" bar per load would bury the tools' own output.
    diffusers_logging.disable_progress_bar()
    target = pick_device(device)
    if dtype == "auto":
        # Half precision is what GPUs sample in; CPUs have no fast float16 path.
        dtype = "float16" if target.type == "cuda" else "float32"
    base = load_base_model(model, single_file_config=single_file_config, weight_dtype=dtype)
    renderer = Renderer(base, clip_skip=clip_skip, max_token_length=max_token_length)
    renderer.pipe.to(target)
    return renderer


def apply_loras(renderer: Renderer, loras: list[AppliedLora]) -> list[str]:
    """Load each LoRA into the renderer's pipeline at its strength; returns their adapter names."""
    from lorafit.networks.loading import load_lora

    names = []
    for index, lora in enumerate(loras):
        # File stems repeat across runs ("lora.safetensors"), so the position makes names unique.
        name = f"{re.sub(r'[^A-Za-z0-9_-]', '_', Path(lora.path).stem)}_{index}"
        names.append(load_lora(renderer.pipe, lora.path, weight=lora.strength, adapter_name=name))
    return names


def _next_index(out: Path) -> int:
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def generate(
    model: str,
    prompt: str | None = None,
    *,
    lora: list[str] | None = None,
    negative_prompt: str = "",
    seed: list[int] = [0],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
    steps: int = 30,
    cfg: float = 7.0,
    width: int | None = None,
    height: int | None = None,
    sampler: str = "euler_a",
    hires_scale: float = 1.0,
    hires_denoise: float = 0.4,
    hires_steps: int | None = None,
    clip_skip: int = 1,
    max_token_length: int | None = None,
    prompt_file: str | None = None,
    out: str = "outputs",
    single_file_config: str | None = None,
    dtype: Dtype = "auto",
    device: str = "auto",
) -> list[Path]:
    """Generate images with a base model and LoRAs at chosen strengths; PNGs carry A1111 parameters.

    Args:
        model: Base model: diffusers directory, hub id or .safetensors/.ckpt single file.
        prompt: The prompt; kohya inline options work here too ("ohwx dog --n blurry --s 20").
        lora: LoRA file with strength, "path.safetensors:0.8" (no ":x" = 1). Repeat --lora for more;
            strengths add up as in A1111/ComfyUI. 0 gives the base model exactly.
        negative_prompt: Negative prompt (a prompt's own --n wins).
        seed: Seed(s); one image per seed. Repeat --seed for a batch: --seed 1 --seed 2.
        steps: Sampling steps.
        cfg: Classifier-free guidance scale.
        width: Width in pixels (multiple of 8); empty = the model's native size.
        height: Height in pixels; empty = like width.
        sampler: euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, pndm, heun, dpm_2, dpm_2_a, unipc.
        hires_scale: Hires fix: upscale factor of the second pass (1 = off; the guides use 1.5).
        hires_denoise: Hires fix: denoising strength of the second pass (the guides use 0.4).
        hires_steps: Hires fix: steps of the second pass; empty = as many as the first.
        clip_skip: A1111 clip skip the LoRA was trained with (SD1/SD2; 2 for many anime models).
        max_token_length: Prompt tokens read, in 75-token chunks as kohya trains with
            ``max_token_length`` 150/225; empty = 75 (longer prompts are cut, as in diffusers).
        prompt_file: A kohya prompt file (.txt/.toml/.json); one image per prompt and seed.
        out: Output folder; files are numbered NNNNN-<seed>.png after the ones already there.
        single_file_config: For single-file models offline: a diffusers directory of the same architecture.
        dtype: Weight dtype; auto = float16 on GPU, float32 on CPU.
        device: auto, cpu, cuda, cuda:1, ...
    """
    requests = ([parse_prompt_line(prompt, "--prompt")] if prompt else []) + (
        read_prompt_file(prompt_file) if prompt_file else []
    )
    if not requests:
        raise LorafitError("give --prompt or --prompt_file")
    loras = [parse_lora_spec(spec) for spec in (lora or [])]
    sampler = canonical_sampler(sampler, key="--sampler")
    hires = HiresFix(hires_scale, hires_denoise, hires_steps)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if not seeds:
        raise LorafitError("--seed: give at least one seed")

    renderer = load_renderer(model, device, dtype, clip_skip, single_file_config, max_token_length)
    apply_loras(renderer, loras)
    side = renderer.default_size
    out_dir = Path(out)
    index = _next_index(out_dir) if out_dir.is_dir() else 0
    written = []
    for request in requests:
        for image_seed in seeds:
            filled = replace(request, negative_prompt=request.negative_prompt or negative_prompt).with_defaults(
                width or side, height or width or side, steps, cfg, image_seed, sampler
            )
            if len(seeds) > 1:  # several --seed values override a prompt's own --d
                filled = replace(filled, seed=image_seed)
            image = renderer(filled, hires)
            parameters = a1111_parameters(filled, model, loras, hires.scale, hires.denoise, hires.steps)
            written.append(save_png(image, out_dir / f"{index:05d}-{filled.seed}.png", parameters))
            index += 1
    log.info("wrote %d image(s) to %s", len(written), out_dir)
    return written
