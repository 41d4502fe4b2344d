"""How every image is drawn, declared once for ``generate``, ``grid``, ``probe`` and the training samples.

jsonargparse turns each dataclass here into a group of options: ``--render.steps 20`` on the
command line of the tools, ``samples.render.steps`` in a training config, and ``--render FILE`` /
``samples.render: FILE`` reads the whole group from one YAML file, so the samples of a run and the
grid made afterwards can share their settings. The same settings give the same pixels in every
verb: a training sample, a grid cell and a ``generate`` image with equal options, prompt, seed and
LoRA weights are the same image (tests/test_samples_callback.py checks it).

The flat spellings these options had before (``--steps``, ``--seed``, ``--device``; ``samples.steps``)
still work, with a one-line notice: :data:`RENDER_RENAMES` and :data:`BASE_RENAMES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from lorafit.errors import LorafitError
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.render import HiresFix
from lorafit.inference.samplers import canonical_sampler

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


def _as_tuple(value, kind: type, key: str) -> tuple:
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    if not items:
        raise LorafitError(f"{key}: give at least one value")
    try:
        return tuple(kind(item) for item in items)
    except (TypeError, ValueError):
        raise LorafitError(f"{key}: expected {kind.__name__} values, got {list(items)}") from None


@dataclass(frozen=True)
class RenderOptions:
    """How each image is drawn. A prompt's own kohya options (--n --w --h --s --l --d --ss) win over these.

    Args:
        sampler: euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, pndm, heun, dpm_2, dpm_2_a, unipc
            (A1111's and kohya's spellings work too).
        steps: Sampling steps.
        cfg: Classifier-free guidance scale. Several values (repeat the flag) draw every image once
            per value; in ``grid`` they are the cfg axis.
        seed: Seed(s): one image per seed (repeat the flag for more); in ``grid`` the seed axis, in
            training samples prompt i uses seed + i. Every image draws its starting noise on the CPU
            from its own seed, so a seed is the same picture on any device.
        width: Width in pixels (a multiple of 8); empty = the training resolution (samples) or the
            model's native size.
        height: Height in pixels; empty = like width.
        negative_prompt: Negative prompt for prompts without their own --n.
        hires_scale: Hires fix (A1111): upscale factor of a second img2img pass; 1 = off, the
            guides use 1.5.
        hires_denoise: Hires fix: denoising strength of the second pass (the guides use 0.4).
        hires_steps: Hires fix: steps of the second pass; empty = as many as the first.
        clip_skip: A1111 clip skip (SD1/SD2; 2 for many anime models); empty = what the LoRA
            trains with (samples) or 1 (the last layer).
        max_token_length: Prompt tokens read, in 75-token chunks as kohya trains with 150/225;
            empty = what the run trains with (samples) or 75 (longer prompts are cut, as in diffusers).
        max_sequence_length: Flux: T5 tokens per prompt; empty = what the run trains with
            (samples) or the model's training default (512 for [dev], 256 for [schnell], 16 for the
            toy Flux base).
    """

    sampler: str = "euler_a"
    steps: int = 30
    cfg: float | list[float] = 7.0
    seed: int | list[int] = 0
    width: int | None = None
    height: int | None = None
    negative_prompt: str = ""
    hires_scale: float = 1.0
    hires_denoise: float = 0.4
    hires_steps: int | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    max_sequence_length: int | None = None

    def __post_init__(self):
        # Checked when the options are built, before any model loads: a typo fails in a second.
        object.__setattr__(self, "sampler", canonical_sampler(self.sampler, key="render.sampler"))
        if not 1 <= self.steps <= 1000:
            raise LorafitError(f"render.steps: {self.steps}; use 1 to 1000 steps")
        if any(value < 0 for value in self.cfgs):
            raise LorafitError(f"render.cfg: {list(self.cfgs)}; CFG scales are >= 0")
        _as_tuple(self.seed, int, "render.seed")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise LorafitError(f"render.{key}: {value}; use a positive multiple of 8 pixels")
        if self.hires_steps is not None and self.hires_steps < 1:
            raise LorafitError(f"render.hires_steps: {self.hires_steps}; use >= 1, or leave it empty")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise LorafitError(f"render.clip_skip: {self.clip_skip}; 1 = the last layer, 2 = the penultimate")
        if self.max_token_length is not None and self.max_token_length < 1:
            raise LorafitError(f"render.max_token_length: {self.max_token_length}; use 150 or 225, or leave it empty")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise LorafitError(
                f"render.max_sequence_length: {self.max_sequence_length}; use the T5 length the LoRA trained with "
                "(512 for FLUX.1 [dev], 256 for [schnell]), or leave it empty"
            )
        HiresFix(self.hires_scale, self.hires_denoise, self.hires_steps)  # raises on bad values

    @property
    def seeds(self) -> tuple[int, ...]:
        return _as_tuple(self.seed, int, "render.seed")

    @property
    def cfgs(self) -> tuple[float, ...]:
        return _as_tuple(self.cfg, float, "render.cfg")

    @property
    def hires(self) -> HiresFix:
        """The hires-fix settings (scale 1 = off)."""
        return HiresFix(self.hires_scale, self.hires_denoise, self.hires_steps)

    def size(self, native: int) -> tuple[int, int]:
        """Width and height in pixels, ``native`` where none is set (height follows width)."""
        width = self.width or native
        return width, self.height or (self.width and width) or native

    def fill(
        self,
        prompt: SamplePrompt,
        native: int,
        seed: int,
        cfg: float,
        *,
        force_seed: bool = False,
        force_cfg: bool = False,
    ) -> SamplePrompt:
        """``prompt`` with every unset field taken from these options (a request a Renderer draws).

        ``force_seed``/``force_cfg`` make ``seed``/``cfg`` win over the prompt's own ``--d``/``--l``
        (a grid axis, or several values given on purpose).
        """
        width, height = self.size(native)
        filled = replace(prompt, negative_prompt=prompt.negative_prompt or self.negative_prompt)
        filled = filled.with_defaults(width, height, self.steps, cfg, seed, self.sampler)
        if force_seed:
            filled = replace(filled, seed=seed)
        if force_cfg:
            filled = replace(filled, cfg=cfg)
        return filled


@dataclass(frozen=True)
class BaseModelOptions:
    """Where the base model is loaded, and how (generate, grid and probe).

    Args:
        device: auto, cpu, cuda, cuda:1, ...; auto = the GPU if there is one.
        dtype: Weight dtype; auto = float16 on a GPU, float32 on the CPU.
        single_file_config: For a single-file model offline: a diffusers directory (or cached hub
            id) of the same architecture; only its configs are read.
    """

    device: str = "auto"
    dtype: Dtype = "auto"
    single_file_config: str | None = None


# The flat spellings the tools had before the groups (old flag -> new flag), kept with a notice.
RENDER_RENAMES = {
    f"--{name}": f"--render.{name}"
    for name in (
        "sampler",
        "steps",
        "cfg",
        "seed",
        "width",
        "height",
        "negative_prompt",
        "hires_scale",
        "hires_denoise",
        "hires_steps",
        "clip_skip",
        "max_token_length",
    )
}
BASE_RENAMES = {f"--{name}": f"--base.{name}" for name in ("device", "dtype", "single_file_config")}
