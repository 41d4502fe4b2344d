"""Turn one :class:`SamplePrompt` into an image with a diffusers pipeline built from a model's parts.

The same code renders training samples (from the LoRA'd modules being trained, no second copy),
``lorafit generate``, the grid cells and the probe, so a grid cell and a ``generate`` call with
the same settings give the same pixels.

Reproducibility: the initial noise comes from a CPU ``torch.Generator`` seeded with the image's
seed, so a seed means the same starting noise on CPU and GPU and whatever else was sampled before
(each image also gets a fresh scheduler). Images are rendered one at a time for the same reason:
in a batch, an image's noise would depend on its position.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from PIL import Image

from lorafit.errors import LorafitError
from lorafit.families.clip_text import encode_tokens, tokenize
from lorafit.families.loading import BaseModel
from lorafit.families.registry import get_family
from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.samplers import make_scheduler
from lorafit.networks.adapter_switch import adapters_disabled

__all__ = ["HiresFix", "Renderer", "adapters_disabled", "build_pipeline", "default_size"]


def build_pipeline(base: BaseModel):
    """A txt2img pipeline over ``base``'s own modules (shared, not copied; LoRA layers included)."""
    scheduler = make_scheduler("euler", base.scheduler_config, base.prediction_type)
    pipe = get_family(base.family).build_pipeline(base, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_size(pipe, base: BaseModel | None = None) -> int:
    """The model's native side in pixels (what its family was trained at)."""
    if base is not None:
        return get_family(base.family).native_size(base)
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@dataclass(frozen=True)
class HiresFix:
    """A1111's "hires fix": upscale the first image, then img2img over it at ``denoise`` strength.

    Attributes:
        scale: Upscale factor (the seeds use 1.5); 1 turns the fix off.
        denoise: img2img denoising strength (the seeds use 0.4).
        steps: Denoising steps actually run in the second pass; None = the first pass's steps
            (A1111's "Hires steps: 0").
    """

    scale: float = 1.5
    denoise: float = 0.4
    steps: int | None = None

    def __post_init__(self):
        if self.scale < 1.0:
            raise LorafitError(f"render.hires_scale: {self.scale}; use >= 1 (1 = off, the guides use 1.5)")
        if not 0.0 < self.denoise <= 1.0:
            raise LorafitError(f"render.hires_denoise: {self.denoise}; use a value in (0, 1] (the guides use 0.4)")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """Upscaled size, rounded down to the VAE's 8-pixel grid."""
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


class Renderer:
    """Renders fully specified :class:`SamplePrompt` s with a pipeline over ``base``'s modules.

    Args:
        base: The model parts (a loaded base model, or a training module's ``base``).
        clip_skip: A1111-style clip skip the LoRA was trained with (SD1/SD2 only).
        max_token_length: Prompt tokens read (kohya's 150/225, in 75-token chunks, as training
            reads captions); empty = 75, as diffusers does.
        max_sequence_length: Flux: T5 tokens per prompt; empty = the family's training default
            (512 for [dev], 256 for [schnell], the T5 tokenizer's ``model_max_length`` if shorter).
            FluxPipeline feeds the padding to the transformer unmasked, so a LoRA is drawn as it
            trained only at the length it trained with.
    """

    def __init__(
        self,
        base: BaseModel,
        clip_skip: int = 1,
        max_token_length: int | None = None,
        max_sequence_length: int | None = None,
    ):
        self.base = base
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length
        self.max_sequence_length = max_sequence_length
        self.pipe = build_pipeline(base)
        self._img2img = None

    @property
    def default_size(self) -> int:
        return default_size(self.pipe, self.base)

    def _common(self, request: SamplePrompt) -> dict:
        if get_family(self.base.family).objective == "flow":
            return self._flow_common(request)
        if not self.max_token_length and (self.base.family == "sdxl" or self.clip_skip <= 1):
            return dict(
                prompt=request.prompt, negative_prompt=request.negative_prompt or None, guidance_scale=request.cfg
            )
        return self._embeddings(request)

    def _embeddings(self, request: SamplePrompt) -> dict:
        # Clip skip on SD1/SD2: diffusers 0.42's own clip_skip path reaches for
        # ``text_encoder.text_model``, which transformers 5 removed; long prompts: diffusers cuts
        # them at 77 tokens. Either way the embeddings are encoded here, by the same function
        # training conditions the UNet with.
        device = self.base.denoiser.device
        prompts = [request.prompt, request.negative_prompt or ""]
        # Textual-inversion tokens of several vectors are written out as the pipeline does it.
        prompts = [self.pipe.maybe_convert_prompt(p, self.base.tokenizers[0]) for p in prompts]
        ids = tokenize(self.base.tokenizers, prompts, device, self.max_token_length)
        text = encode_tokens(self.base.family, self.base.text_encoders, ids, self.clip_skip)
        hidden, pooled = text.hidden_states, text.pooled
        if (
            self.base.family == "sdxl"
            and not request.negative_prompt
            and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
        ):
            # As the SDXL pipeline does: no negative prompt = zero embeddings, not those of "".
            hidden = torch.cat([hidden[:1], torch.zeros_like(hidden[1:])])
            pooled = torch.cat([pooled[:1], torch.zeros_like(pooled[1:])])
        embeds = dict(prompt_embeds=hidden[:1], negative_prompt_embeds=hidden[1:], guidance_scale=request.cfg)
        if pooled is not None:
            embeds.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
        return embeds

    def _flow_common(self, request: SamplePrompt) -> dict:
        """Flow families: their pipeline's arguments, as the family maps ``--l``/``--g``/``--n`` onto them,
        with the text length the LoRA trained with where the pipeline takes one."""
        family = get_family(self.base.family)
        arguments = family.sample_arguments(request.prompt, request.negative_prompt, request.cfg, request.guidance)
        if "max_sequence_length" in inspect.signature(type(self.pipe).__call__).parameters:
            arguments["max_sequence_length"] = self.t5_length
        return arguments

    @torch.no_grad()
    def encode(self, request: SamplePrompt) -> dict:
        """The request's text conditioning, computed now, as pipeline arguments for ``__call__(encoded=...)``.

        Encoding first lets a caller hold the text encoders on the device only for this step (the
        training samples do, so the text encoders and the VAE never take memory at the same time).
        The pipeline's own ``encode_prompt`` is called with the arguments its ``__call__`` would use,
        so the image is the same as when the pipeline encodes the prompt itself.
        """
        common = self._common(request)
        if "prompt" not in common:
            return common
        device = self.base.denoiser.device  # not pipe._execution_device: host-parked parts would report the CPU
        family = get_family(self.base.family)
        if family.objective == "flow":  # the family's pipeline encodes, with the arguments its call would use
            return family.encode_sample_arguments(self.pipe, common, device)
        do_cfg = request.cfg > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        negative = request.negative_prompt or None
        if self.base.family == "sdxl":
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            encoded = self.pipe.encode_prompt(
                prompt=request.prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative,
            )
        else:
            names = ("prompt_embeds", "negative_prompt_embeds")
            encoded = self.pipe.encode_prompt(request.prompt, device, 1, do_cfg, negative)
        return dict(zip(names, encoded), guidance_scale=request.cfg)

    @property
    def t5_length(self) -> int:
        """T5 tokens per prompt (flow families): ``max_sequence_length`` or the family's default."""
        from lorafit.families.family import TextOptions

        options = TextOptions(max_sequence_length=self.max_sequence_length)
        return get_family(self.base.family).sequence_length(self.base, options)

    def _scheduler(self, request: SamplePrompt):
        return make_scheduler(request.sampler, self.base.scheduler_config, self.base.prediction_type)

    @torch.no_grad()
    def __call__(
        self, request: SamplePrompt, hires: HiresFix | None = None, encoded: dict | None = None
    ) -> Image.Image:
        """One image for a request whose fields are all set (see ``RenderOptions.fill``).

        ``encoded``: the request's conditioning from :meth:`encode`; empty = encoded now.
        """
        conditioning = encoded if encoded is not None else self._common(request)
        self.pipe.scheduler = self._scheduler(request)
        # Some schedulers draw fresh noise from the global RNG at every step (FlowMatchEuler's
        # stochastic sampling, which pipelines call without their generator): seeding it here, in a
        # fork, keeps "one seed, one image" for every sampler without touching the caller's RNG.
        device = self.base.denoiser.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(int(request.seed))
            image = self.pipe(
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                generator=_generator(request.seed),
                output_type="pil",
                **conditioning,
            ).images[0]
        if hires is None or hires.scale == 1.0:
            return image
        return self._hires_pass(request, image, hires, conditioning)

    def _hires_pass(
        self, request: SamplePrompt, image: Image.Image, hires: HiresFix, conditioning: dict
    ) -> Image.Image:
        from diffusers import AutoPipelineForImage2Image

        if self._img2img is None:
            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)  # shares every module
            self._img2img.set_progress_bar_config(disable=True)
        self._img2img.scheduler = self._scheduler(request)
        upscaled = image.resize(hires.size(image.width, image.height), Image.LANCZOS)
        # diffusers runs int(steps * strength) of the schedule; asking for steps / strength makes
        # the second pass run the requested number, as A1111's hires fix does. Rounded up, never
        # down: int(2 * 0.4) = 0 steps (1 step wanted at denoise 0.4) crashed the pipeline.
        wanted = hires.steps or request.steps
        schedule = max(wanted, math.ceil(wanted / hires.denoise))
        while int(schedule * hires.denoise) < wanted:  # float rounding of schedule * denoise
            schedule += 1
        return self._img2img(
            image=upscaled,
            strength=hires.denoise,
            num_inference_steps=schedule,
            generator=_generator(request.seed),
            output_type="pil",
            **conditioning,
        ).images[0]
