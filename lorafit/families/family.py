"""What every model family provides: the contract between a base model and the rest of lorafit.

A family (SD1.x, SDXL, Flux.1, ...) is one :class:`Family` subclass in its own module plus one
entry in :mod:`lorafit.families.registry`. Training, export, loading LoRAs and rendering ask the
family, never a family name, for anything that differs between architectures:

- which diffusers components it has (the denoiser is a UNet or a transformer; which text encoders);
- how it is detected from a pipeline directory or a single checkpoint file, and loaded;
- how captions become conditioning tensors (:meth:`Family.encode_text`), which of those can be
  cached, and how the denoiser is called on noisy latents (:meth:`Family.predict`);
- its training objective (``ddpm``: epsilon/v-prediction on a beta schedule; ``flow``: rectified
  flow on sigmas in (0, 1]);
- the modules each LoRA target preset selects, and the kohya/ComfyUI names of its modules;
- a tiny random-weight pipeline built from the same classes, for offline tests.

``BaseModel`` is the loaded, frozen model with what was detected about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from lorafit.errors import LorafitError

Objective = Literal["ddpm", "flow"]


@dataclass(frozen=True)
class TextOptions:
    """How captions are turned into conditioning (the ``model.conditioning`` config group).

    Args:
        clip_skip: SD1/SD2: use the hidden state this many layers from the end (2 = A1111 "clip
            skip 2"). SDXL always uses the penultimate layer; Flux reads CLIP's pooled output only.
        max_token_length: CLIP families: kohya's ``max_token_length``: caption tokens read (150
            or 225) instead of CLIP's 75, encoded in 75-token chunks whose hidden states are joined
            (kohya's method; A1111 and ComfyUI join chunks at generation time). Empty: 75.
        max_sequence_length: T5 and LLM families: tokens per caption. Empty: the family's
            default, as its pipeline uses (Flux.1 [dev] 512, [schnell] 256, at most the T5 tokenizer's
            ``model_max_length``; Qwen-Image 1024; Z-Image and FLUX.2 [klein] 512).
        guidance: Guidance-distilled models (Flux.1 [dev]): the guidance value fed to the
            guidance embedding during training. 1.0 is what kohya, ai-toolkit and SimpleTuner
            train with; generation then uses the usual 3-4. Ignored by models without one.
    """

    clip_skip: int = 1
    max_token_length: int | None = None
    max_sequence_length: int | None = None
    guidance: float = 1.0


@dataclass(frozen=True)
class KohyaModule:
    """One module of a family's kohya/ComfyUI layout that is not a plain rename of a diffusers module.

    ``parts`` are (diffusers module name, output rows) in output order: several parts for a fused
    module (Flux's ``img_attn.qkv`` = ``to_q``, ``to_k``, ``to_v``), one for a rename. ``swap_halves``:
    the two halves of the output rows are swapped between the layouts.
    """

    stem: str
    parts: tuple[tuple[str, int], ...]
    swap_halves: bool = False
    path: str = ""  # the module's dotted path in the original model (BFL's ``double_blocks.0.img_attn.qkv``)

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


@dataclass
class BaseModel:
    """The frozen parts of a base model, with what lorafit detected about them.

    ``denoiser`` is the UNet (SD families) or the transformer (Flux and later families);
    ``text_encoders`` and ``tokenizers`` are in the family's component order.
    """

    family: str
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    scheduler_config: dict = field(default_factory=dict)
    source: str = ""
    # The dtype the denoiser computes in when its storage differs (fp8 / NF4 / int8 weights); None =
    # the denoiser's own dtype.
    compute_dtype: torch.dtype | None = None
    # The pipeline's own settings from model_index.json (FLUX.2 [klein]'s ``is_distilled``).
    pipeline_config: dict = field(default_factory=dict)

    # module name -> (its first weight's dtype, its dtype) at the last ``denoiser_dtype``/``vae_dtype`` call.
    _dtypes_seen: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def denoiser_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in (called every training step)."""
        return self.compute_dtype or self._module_dtype("denoiser")

    def vae_dtype(self) -> torch.dtype:
        """The VAE's dtype (called every training step that encodes pixels)."""
        return self._module_dtype("vae")

    def _module_dtype(self, name: str) -> torch.dtype:
        # diffusers' ``ModelMixin.dtype`` walks every submodule for layerwise-casting hooks: 4-6 ms a
        # step on the toy UNet, whose LoRA layers add thousands of modules. Its answer changes only
        # when the weights are cast, which changes the first weight's dtype too: that is the cache key.
        module = getattr(self, name)
        first = next(module.parameters()).dtype
        seen = self._dtypes_seen.get(name)
        if seen is None or seen[0] != first:
            seen = self._dtypes_seen[name] = (first, module.dtype)
        return seen[1]

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under its SD name (kept for code written for the UNet families)."""
        return self.denoiser


class Family(ABC):
    """One model family. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    title: ClassVar[str]  # for tables and messages, e.g. "Stable Diffusion XL"
    objective: ClassVar[Objective] = "ddpm"
    denoiser_component: ClassVar[str] = "unet"
    text_encoder_components: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)
    # Text encoders a LoRA may train (never T5: kohya, ai-toolkit and SimpleTuner keep it frozen).
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    # Conditioning tensors encode_text returns per caption; `lorafit cache` stores exactly these.
    conditioning_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # kohya/ComfyUI name prefix of each component's LoRA modules.
    kohya_prefixes: ClassVar[dict[str, str]] = {}
    # Text encoders that are CLIP models, whose kohya names use transformers-4's ``text_model.`` level.
    clip_components: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    # Other trainers' prefixes for the denoiser's modules named by diffusers paths (read, not written):
    # OneTrainer's ``lora_transformer``, SimpleTuner's LyCORIS ``lycoris``.
    kohya_aliases: ClassVar[tuple[str, ...]] = ()
    pipeline_class: ClassVar[str]  # the diffusers txt2img pipeline
    load_formats: ClassVar[tuple[str, ...]] = ("diffusers directory", "hub id", "single file")
    # What kohya writes into ss_base_model_version, and SAI modelspec's architecture.
    base_model_version: ClassVar[str] = ""
    # How its kohya/ComfyUI files name the denoiser's modules (the README's family table).
    kohya_names: ClassVar[str] = "diffusers module paths"

    # ---- detection and loading -------------------------------------------------------------

    @classmethod
    @abstractmethod
    def matches_index(cls, index: dict, denoiser_config: dict) -> bool:
        """Whether a diffusers ``model_index.json`` (+ the denoiser's config) is this family."""

    @classmethod
    def matches_single_file(cls, keys: set[str]) -> bool:
        """Whether a single checkpoint with these tensor names is this family."""
        return False

    def pipeline_type(self):
        """The diffusers pipeline class (imported on first use: diffusers is slow to import)."""
        import diffusers

        try:
            return getattr(diffusers, self.pipeline_class)
        except AttributeError:
            raise LorafitError(
                f"{self.title} needs diffusers' {self.pipeline_class}, which diffusers {diffusers.__version__} lacks; "
                "upgrade diffusers (pip install -U diffusers)"
            ) from None

    def pipeline_kwargs(self) -> dict:
        """Extra ``from_pretrained``/``from_single_file`` arguments (SD1/SD2: no safety checker)."""
        return {}

    def load_pretrained(self, source: str, revision: str | None, variant: str | None, quantization=None):
        """The pipeline from a diffusers directory or hub id; ``quantization`` is a diffusers
        ``PipelineQuantizationConfig`` for the denoiser, or None."""
        extra = {"quantization_config": quantization} if quantization is not None else {}
        return self.pipeline_type().from_pretrained(
            source, revision=revision, variant=variant, **self.pipeline_kwargs(), **extra
        )

    def load_single_file(
        self, path: str, config: str | None, parts: dict[str, str], quantization: str, dtype: torch.dtype
    ):
        """The pipeline from a single checkpoint file (``parts``: separately downloaded components;
        ``quantization``: ``none``/``nf4``/``int8``/``fp8``, see ``model.quantization``)."""
        if parts:
            raise LorafitError(f"model.parts: {self.title} single files carry every part; remove {sorted(parts)}")
        if quantization in ("nf4", "int8"):
            raise LorafitError(f"model.quantization: not supported for {self.title} single files")
        return self.pipeline_type().from_single_file(path, config=config, **self.pipeline_kwargs())

    def prediction_type(self, scheduler_config: dict) -> str:
        return "flow" if self.objective == "flow" else scheduler_config.get("prediction_type", "epsilon")

    def modelspec_architecture(self, prediction_type: str) -> str:
        return f"{self.name}/lora"

    # ---- conditioning and the denoiser --------------------------------------------------------

    @abstractmethod
    def encode_text(
        self, base: BaseModel, captions: list[str], options: TextOptions, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """The conditioning tensors of ``captions`` (keys: :attr:`conditioning_keys`), as the
        family's diffusers pipeline computes them, so training conditions exactly as inference."""

    def check_cached_conditioning(self, base: BaseModel, batch: dict, options: TextOptions) -> None:
        """Refuse cached conditioning of the wrong shape for ``options`` (one line, raised).

        The default accepts any: families whose encoders have a fixed output length need no check.
        """
        return

    def check_cache_settings(self, base: BaseModel, cached: dict, options: TextOptions) -> None:
        """Refuse a text-embedding cache (``dataset.json``'s ``cached`` section) made with other
        conditioning settings than ``options`` (one line saying how to re-cache, raised)."""
        return

    @abstractmethod
    def predict(
        self,
        base: BaseModel,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict,
        options: TextOptions,
    ) -> torch.Tensor:
        """The denoiser's output for ``noisy`` latents [B, C, h, w], in the same layout.

        ``timesteps`` are integer DDPM timesteps for ``ddpm`` families and sigmas in (0, 1] for
        ``flow`` families.
        """

    def vae_posterior(self, vae: torch.nn.Module, pixels: torch.Tensor):
        """The VAE's posterior for ``pixels`` [B, 3, H, W]: a diffusers ``DiagonalGaussianDistribution``
        over 4-D latents [B, C, h, w] (its ``parameters`` are what ``lorafit cache`` stores). Families
        whose VAE works on video (Qwen-Image's) add and remove the frame axis here."""
        return vae.encode(pixels).latent_dist

    def latent_channels(self, vae: torch.nn.Module) -> int:
        """Channels of the VAE's latents (before any packing the denoiser does)."""
        return int(vae.config.latent_channels)

    def vae_scale_factor(self, vae: torch.nn.Module) -> int:
        """How many pixels one latent spans per side (8 for every released family)."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def normalize_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's scale: ``(z - shift) * scale`` (Flux has a shift, SD none)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def latent_size_multiple(self) -> int:
        """Latent sides must be multiples of this (Flux packs 2x2 latent patches into tokens)."""
        return 1

    def resolution_shift(self, latent_height: int, latent_width: int, scheduler_config: dict) -> float | None:
        """Flow families with resolution-dependent shifting: the shift ``exp(mu)`` their pipeline
        applies at this latent size; None where the family has none."""
        return None

    def text_layers_used(self, encoder_index: int, num_layers: int, options: TextOptions) -> int:
        """How many of a text encoder's layers the conditioning reads, counted from the input."""
        return num_layers

    def sequence_length(self, base: BaseModel, options: TextOptions) -> int | None:
        """Families with a long-sequence text encoder (T5, an LLM): the token positions a caption is read
        to (``model.conditioning.max_sequence_length`` or the family's default); None for CLIP families."""
        return None

    def guidance_distilled(self, base: BaseModel) -> bool:
        """Whether the denoiser takes an embedded guidance value (FLUX.1 [dev]), fed ``options.guidance``."""
        return False

    # ---- networks ---------------------------------------------------------------------------

    @abstractmethod
    def preset_modules(self, denoiser: torch.nn.Module, preset: str, with_conv_blocks: bool = False) -> set[str]:
        """Module names of the denoiser a LoRA target preset (``attn``, ``attn-mlp``, ``full``) selects."""

    def kohya_stem(self, component: str, module: str, config: Any = None) -> str:
        """The kohya/ComfyUI key stem of ``module`` of ``component``: dots become underscores, or,
        for a denoiser with a :meth:`kohya_layout`, the stem of the layout's module that holds it."""
        if component in ("transformer", "unet") and (layout := self.kohya_layout(config)) is not None:
            for stem, kohya_module in layout.items():
                if any(name == module for name, _ in kohya_module.parts):
                    return stem
            raise LorafitError(f"{self.title} {component} module {module} has no name in {self.kohya_names}")
        prefix = self.kohya_prefixes.get(component)
        if prefix is None:
            raise LorafitError(f"{self.name} has no component {component!r} for kohya names")
        if component in self.clip_components and not module.startswith("text_model."):
            module = f"text_model.{module}"  # transformers-4 CLIP names, which every consumer reads
        return f"{prefix}_" + module.replace(".", "_")

    def kohya_layout(self, denoiser_config: Any) -> dict[str, KohyaModule] | None:
        """The denoiser's kohya modules by stem where they are not 1:1 renames of diffusers modules
        (Flux's BFL layout fuses some); None where :meth:`kohya_stem` names every module."""
        return None

    # ---- inference and tests ------------------------------------------------------------------

    def build_pipeline(self, base: BaseModel, scheduler):
        """A txt2img pipeline over ``base``'s own modules (shared, not copied). The default is the
        pipeline of one text encoder and a transformer (Qwen-Image, Z-Image, Chroma)."""
        return self.pipeline_type()(
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=base.text_encoders[0],
            tokenizer=base.tokenizers[0],
            transformer=base.denoiser,
        )

    @abstractmethod
    def tiny_pipeline(self, seed: int = 0):
        """A tiny random-weight pipeline of this architecture (the real classes, small configs)."""

    def native_size(self, base: BaseModel) -> int:
        """The side in pixels the model was trained at (samples' default)."""
        return int(getattr(base.denoiser.config, "sample_size", 64) * self.vae_scale_factor(base.vae))

    def sample_arguments(self, prompt: str, negative_prompt: str, cfg: float, guidance: float | None) -> dict:
        """Flow families: the txt2img pipeline's arguments for one image (``--l`` = ``cfg``, ``--g`` =
        ``guidance``), with the prompt as text. The default is diffusers' common signature."""
        arguments = dict(prompt=prompt, guidance_scale=cfg)
        if negative_prompt:
            arguments["negative_prompt"] = negative_prompt
        return arguments

    def encode_sample_arguments(self, pipe, arguments: dict, device) -> dict:
        """:meth:`sample_arguments` with the text encoded now by the pipeline's own ``encode_prompt``, so
        the text encoders can leave the device before denoising. The default leaves encoding to the call."""
        return arguments


# ---- module selection helpers shared by the families' target presets -------------------------


def adaptable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of ``model`` by name (never inside an existing PEFT adapter)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name and ".base_layer" not in name
    }


def modules_inside(model: torch.nn.Module, class_names: tuple[str, ...]) -> set[str]:
    """Names of the Linear/Conv2d modules that sit inside a block of one of ``class_names``."""
    found: set[str] = set()
    for block_name, block in model.named_modules():
        if type(block).__name__ in class_names:
            for name, module in block.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name:
                    found.add(f"{block_name}.{name}" if name else block_name)
    return found
