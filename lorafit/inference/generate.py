"""``lorafit generate``: images from a base model with any number of LoRAs, each at its own strength.

    lorafit generate --model sdxl-base --prompt "ohwx dog in a park" \\
        --lora runs/dog/lora/dog-epoch-004.safetensors:0.8 --lora style.safetensors:0.4:lbw=OUTALL \\
        --render.seed 1 --render.seed 2 --render.steps 30 --render.cfg 7 --render.hires_scale 1.5

LoRA files are read by :func:`lorafit.load_lora`: kohya/LyCORIS files from any trainer and every
format lorafit writes. Each PNG carries its settings as A1111-style ``parameters`` text. Three
steps: :func:`plan_images` checks everything the user gave (before a model loads), the renderer
draws, :func:`write_images` numbers and saves the files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import load_base_model, resolve_model_source
from lorafit.inference.lora_specs import parse_lora_spec
from lorafit.inference.png_info import AppliedLora, a1111_parameters, save_png
from lorafit.inference.progress import image_progress
from lorafit.inference.prompts import SamplePrompt, parse_prompt_line, read_prompt_file
from lorafit.inference.render import Renderer
from lorafit.inference.render_options import BASE_RENAMES, RENDER_RENAMES, BaseModelOptions, RenderOptions

log = logging.getLogger("lorafit.generate")

__all__ = ["apply_loras", "generate", "load_renderer", "parse_lora_spec"]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_renderer(
    model: str, base: BaseModelOptions = BaseModelOptions(), render: RenderOptions = RenderOptions()
) -> Renderer:
    """Load ``model`` (diffusers dir, hub id or single file) and wrap it in a :class:`Renderer` on the device."""
    from diffusers.utils import logging as diffusers_logging

    resolve_model_source(model, key="model")
    # One "Loading pipeline components" bar per load would bury the tools' own output.
    diffusers_logging.disable_progress_bar()
    target = pick_device(base.device)
    dtype = base.dtype
    if dtype == "auto":
        # Half precision is what GPUs sample in; CPUs have no fast float16 path.
        dtype = "float16" if target.type == "cuda" else "float32"
    loaded = load_base_model(model, single_file_config=base.single_file_config, weight_dtype=dtype)
    renderer = Renderer(
        loaded,
        clip_skip=render.clip_skip or 1,
        max_token_length=render.max_token_length,
        max_sequence_length=render.max_sequence_length,
    )
    renderer.pipe.to(target)
    return renderer


def apply_loras(renderer: Renderer, loras: list[AppliedLora]) -> list[str]:
    """Load each LoRA into the renderer's pipeline at its strength (and block weights); returns their adapter names.

    A file may carry textual-inversion embeddings (a pivotal-tuning bundle) or be an embedding file:
    those load too (:mod:`lorafit.inference.embeddings`); an embedding-only file has no adapter name.
    """
    from lorafit.inference.embeddings import load_lora_or_embedding

    names = []
    for index, lora in enumerate(loras):
        # File stems repeat across runs ("lora.safetensors"), so the position makes names unique.
        name = f"{re.sub(r'[^A-Za-z0-9_-]', '_', Path(lora.path).stem)}_{index}"
        loaded, _ = load_lora_or_embedding(
            renderer.pipe, lora.path, weight=lora.strength, adapter_name=name, block_weights=lora.block_weights
        )
        if loaded:
            names.append(loaded)
    return names


def a1111_loras(loras: list[AppliedLora], family: str) -> list[AppliedLora]:
    """The LoRAs with their block weights as A1111's extension reads them (``lbw=`` a preset or a vector)."""
    from lorafit.networks.block_weights import parse_block_weights

    return [
        replace(lora, block_weights=parse_block_weights(lora.block_weights, family).a1111())
        if lora.block_weights
        else lora
        for lora in loras
    ]


@dataclass(frozen=True)
class ImagePlan:
    """What ``generate`` draws: every prompt at every seed and CFG, with these LoRAs."""

    prompts: list[SamplePrompt]
    loras: list[AppliedLora]
    render: RenderOptions

    @property
    def count(self) -> int:
        return len(self.prompts) * len(self.render.seeds) * len(self.render.cfgs)

    def requests(self, native: int) -> list[SamplePrompt]:
        """Every image as a fully specified request; several seeds/CFGs override a prompt's own --d/--l."""
        seeds, cfgs = self.render.seeds, self.render.cfgs
        return [
            self.render.fill(prompt, native, seed, cfg, force_seed=len(seeds) > 1, force_cfg=len(cfgs) > 1)
            for prompt in self.prompts
            for cfg in cfgs
            for seed in seeds
        ]


def plan_images(
    prompt: str | None, prompt_file: str | None, lora: list[str] | None, render: RenderOptions
) -> ImagePlan:
    """Check and gather the prompts and LoRAs (no model needed): a typo fails before minutes of loading."""
    prompts = ([parse_prompt_line(prompt, "--prompt")] if prompt else []) + (
        read_prompt_file(prompt_file) if prompt_file else []
    )
    if not prompts:
        raise LorafitError("give --prompt or --prompt_file")
    return ImagePlan(prompts, [parse_lora_spec(spec) for spec in (lora or [])], render)


def _next_index(out: Path) -> int:
    numbers = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"^(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def write_images(plan: ImagePlan, renderer: Renderer, model: str, out: Path) -> list[Path]:
    """Draw every planned image and write it as ``NNNNN-<seed>.png`` after the files already in ``out``."""
    loras = a1111_loras(plan.loras, renderer.base.family)
    hires = plan.render.hires
    index = _next_index(out) if out.is_dir() else 0
    written = []
    with image_progress(plan.count, "generate") as bar:
        for request in plan.requests(renderer.default_size):
            image = renderer(request, hires)
            parameters = a1111_parameters(request, model, loras, hires.scale, hires.denoise, hires.steps)
            written.append(save_png(image, out / f"{index:05d}-{request.seed}.png", parameters))
            index += 1
            bar.update()
    return written


def generate(
    model: str,
    prompt: str | None = None,
    *,
    lora: list[str] | None = None,
    prompt_file: str | None = None,
    out: str = "outputs",
    render: RenderOptions = RenderOptions(),
    base: BaseModelOptions = BaseModelOptions(),
) -> list[Path]:
    """Generate images with a base model and LoRAs at chosen strengths; PNGs carry A1111 parameters.

    Args:
        model: Base model: diffusers directory, hub id or .safetensors/.ckpt single file.
        prompt: The prompt; kohya inline options work here too ("ohwx dog --n blurry --s 20").
        lora: A LoRA file, with a strength and block weights if wanted: "x.safetensors" (strength 1),
            "x.safetensors:0.8", "x.safetensors:0.8:lbw=INALL" (A1111's LoRA Block Weight: a preset,
            a vector of 17/26 values, SDXL 12/20, or named blocks "IN=1,MID=0.5,OUT=0"). Repeat
            --lora for more; strengths add up as in A1111/ComfyUI; 0 gives the base model exactly.
            A pivotal-tuning run's file brings its textual-inversion embedding; an embedding file
            (A1111, ComfyUI, kohya or diffusers layout) loads as an embedding.
        prompt_file: A kohya prompt file (.txt/.toml/.json); one image per prompt, seed and CFG.
        out: Output folder; files are numbered NNNNN-<seed>.png after the ones already there.
        render: How each image is drawn (sampler, steps, CFG, seeds, size, hires fix, ...).
        base: Where the base model is loaded (device, dtype, single-file config).
    """
    plan = plan_images(prompt, prompt_file, lora, render)
    renderer = load_renderer(model, base, render)
    apply_loras(renderer, plan.loras)
    written = write_images(plan, renderer, model, Path(out))
    log.info("wrote %d image(s) to %s", len(written), out)
    return written


generate.renamed_flags = {**RENDER_RENAMES, **BASE_RENAMES}
