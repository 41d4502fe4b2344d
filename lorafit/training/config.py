"""The training module's settings, grouped by concern, each field documented (it becomes ``--help``).

``model.network.*`` (the adapter), ``model.optimizer.*`` (optimizer and learning-rate schedule),
``model.noise.*`` (the forward process: noise and timesteps/sigmas), ``model.loss.*`` (what is
regressed and how it is weighted), ``model.conditioning.*`` (captions to conditioning,
:class:`~lorafit.families.family.TextOptions`) and ``model.memory.*`` (speed and memory). Every
check of a value against the others lives in :mod:`lorafit.training.settings_checks`, run before any
weights load.

The groups are frozen dataclasses, so the defaults in the module's signature are safe to share.
kohya's option names are given in each docstring; :mod:`lorafit.training.legacy_keys` maps the
flat keys of earlier lorafit versions onto these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lorafit.families.family import TextOptions
from lorafit.networks.adapters import DEFAULT_TEXT_ENCODER_TARGETS
from lorafit.networks.network_types import DoraAxis, NetworkSpec, NetworkType
from lorafit.networks.presets import TargetPreset
from lorafit.training.losses import HuberSchedule, LossType
from lorafit.training.optim import OptimizerName, SchedulerName

TimestepSampling = Literal["uniform", "logit_normal", "sigmoid"]
FlowWeighting = Literal["none", "sigma_sqrt", "cosmap"]


@dataclass(frozen=True)
class NetworkConfig:
    """The adapter: its type, size and the modules it sits on (kohya's ``network_*`` options).

    Args:
        type: ``lora``; ``locon`` (LoRA also on ResNet/Down/Upsample convs, kohya's ``conv_dim``;
            UNet families only); ``loha``, ``lokr`` (LyCORIS ``algo``); ``dora`` (LoRA with learnt
            per-channel magnitude, LyCORIS ``dora_wd``). See docs/network-types.md.
        rank: LoRA rank (kohya's ``network_dim``); LoHa/LoKr: their rank or factor dimension.
        alpha: Alpha (kohya's ``network_alpha``); the update is scaled by ``alpha / rank``. Empty
            means ``alpha = rank`` (scale 1). kohya's default is 1; alpha 0 is refused (kohya and
            A1111 read a written 0 as alpha = rank).
        preset: Denoiser modules to adapt, per family (docs/network-types.md): ``attn``
            (attention projections), ``attn-mlp`` (also the feed-forward Linears; kohya's default
            on UNets) or ``full`` (every Linear/conv incl. ResNets or modulation and embedders).
        targets: Denoiser modules to adapt instead of ``preset``: name suffixes or one full-match
            regex. Empty: the preset decides.
        include: Extra modules: regexes matched against module names (a name matches when it
            equals the pattern or ends in ``.`` + pattern), denoiser and text encoders.
        exclude: Modules not to adapt, regexes as for ``include`` (applied last).
        conv_rank: Rank of convolutions larger than 1x1 (kohya's ``conv_dim``); empty = ``rank``.
        conv_alpha: Their alpha (kohya's ``conv_alpha``); empty = scale 1 when ``conv_rank`` is
            set, else ``alpha``.
        rank_pattern: Rank per module, ``{regex: rank}``; the first matching regex wins (kohya's
            block dims).
        alpha_pattern: Alpha per module, ``{regex: alpha}``, as ``rank_pattern``.
        lokr_factor: LoKr only: the Kronecker factor (LyCORIS's ``factor``); -1 = as square as possible.
        dora_axis: DoRA only: ``output`` learns a magnitude per output channel (PEFT's and the
            paper's; files load exactly in diffusers and LyCORIS, not in A1111/ComfyUI) or ``input``
            per input channel (LyCORIS ``wd_on_output=False``, OneTrainer's default: kohya files load
            exactly in A1111, ComfyUI and Forge; no diffusers-format file). See docs/network-types.md.
        train_text_encoder: Also train the network on the text encoder(s) the family allows
            (CLIP; never T5).
        text_encoder_targets: Text-encoder modules to adapt (suffixes or a regex).
    """

    type: NetworkType = "lora"
    rank: int = 16
    alpha: float | None = None
    preset: TargetPreset = "attn"
    targets: list[str] | str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lokr_factor: int = -1
    dora_axis: DoraAxis = "output"
    train_text_encoder: bool = False
    text_encoder_targets: list[str] | str = field(default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGETS))

    def adapter_spec(self) -> NetworkSpec:
        """The adapter these settings describe, as lorafit.networks builds it."""
        return NetworkSpec(
            self.type,
            self.rank,
            self.alpha,
            self.conv_rank,
            self.conv_alpha,
            dict(self.rank_pattern),
            dict(self.alpha_pattern),
            self.lokr_factor,
            self.dora_axis,
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule (kohya's ``optimizer_type``, ``*_lr``, ``lr_scheduler*``).

    Args:
        name: ``AdamW`` (torch's fused kernel unless ``args`` sets ``fused`` or ``foreach``),
            ``AdamW8bit``/``Lion8bit`` (bitsandbytes), ``Adafactor`` (transformers), ``Prodigy``
            (prodigyopt; learning rates near 1.0), ``Lion`` (lion-pytorch; ~3-10x lower learning rate
            than AdamW).
        learning_rate: Base learning rate (kohya's ``learning_rate``), for every part whose own
            rate is empty.
        denoiser_lr: Learning rate of the UNet/transformer LoRA (kohya's ``unet_lr``); empty =
            ``learning_rate``; 0 leaves the denoiser without LoRA (text-encoder-only training).
        text_encoder_lr: Learning rate of the (first) text encoder's LoRA (kohya's
            ``text_encoder_lr``); empty = ``learning_rate``; 0 leaves it frozen, without LoRA.
        text_encoder_2_lr: SDXL: the second text encoder's (OpenCLIP bigG); empty = ``text_encoder_lr``.
        weight_decay: Weight decay; empty keeps the optimizer's default (AdamW 0.01, others 0).
        betas: Betas (AdamW, Lion, Prodigy); empty keeps the optimizer's default.
        args: Extra constructor arguments (kohya's ``optimizer_args``), e.g. for Adafactor
            ``{scale_parameter: false, relative_step: false, warmup_init: false}``.
        lr_scheduler: Schedule (diffusers/kohya names), stepped per optimizer step.
        lr_warmup_steps: Linear warmup: optimizer steps if >= 1, a fraction of the run if < 1.
        lr_scheduler_num_cycles: Hard restarts of ``cosine_with_restarts``.
        lr_scheduler_power: Exponent of ``polynomial`` decay.
    """

    name: OptimizerName = "AdamW"
    learning_rate: float = 1e-4
    denoiser_lr: float | None = None
    text_encoder_lr: float | None = None
    text_encoder_2_lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: SchedulerName = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0


@dataclass(frozen=True)
class NoiseConfig:
    """The forward process: noise and where on the noise schedule each sample is trained.

    DDPM families (SD1/SD2/SDXL) use the ``offset``..``max_timestep`` fields; flow-matching families
    (Flux) use ``timestep_sampling``..``shift`` and refuse the DDPM-only ones.

    Args:
        offset: Offset noise strength, ~0.05-0.1 (kohya's ``noise_offset``).
        offset_random_strength: Scale the offset by a uniform [0, 1) draw per batch.
        multires_iterations: Pyramid (multi-resolution) noise levels, ~6-10; 0 = off.
        multires_discount: Weight decay per pyramid level (kohya's default 0.3).
        ip_gamma: Input-perturbation noise strength, ~0.1 (kohya's ``ip_noise_gamma``).
        ip_gamma_random_strength: Scale ``ip_gamma`` by a uniform [0, 1) draw per batch.
        zero_terminal_snr: Rescale the noise schedule to zero SNR at the last timestep (needs a
            v-prediction model).
        min_timestep: Smallest DDPM training timestep (inclusive).
        max_timestep: Largest DDPM training timestep (exclusive); empty = the schedule's length.
        timestep_sampling: Flow families: how sigmas are drawn: ``uniform``; ``logit_normal``
            (SD3's, with ``logit_mean``/``logit_std``); ``sigmoid`` (kohya's: sigmoid of a scaled
            normal draw, ``sigmoid_scale``).
        logit_mean: Mean of the ``logit_normal`` draw.
        logit_std: Standard deviation of the ``logit_normal`` draw.
        sigmoid_scale: Scale of the normal draw inside ``sigmoid`` (kohya's ``sigmoid_scale``).
        shift: Flow families: shift of the drawn sigmas towards noise, ``s*t / (1 + (s-1)*t)``: a
            number (kohya's ``discrete_flow_shift``, e.g. 3.0), ``resolution`` (Flux inference's
            resolution-dependent shift, kohya's ``flux_shift``), or empty for the family's default
            (Flux: ``resolution``).
    """

    offset: float = 0.0
    offset_random_strength: bool = False
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    ip_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None
    timestep_sampling: TimestepSampling = "sigmoid"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float | Literal["resolution"] | None = None


@dataclass(frozen=True)
class LossConfig:
    """What is regressed and how samples are weighted.

    Args:
        type: ``l2`` (MSE), ``l1``, ``huber`` or ``smooth_l1`` (kohya's pseudo-Huber forms).
        huber_schedule: How the Huber ``c`` varies with the timestep: ``constant``, ``exponential``, ``snr``.
        huber_c: Huber ``c`` (kohya's ``huber_c``).
        huber_scale: Multiplies ``c`` in the constant and exponential schedules.
        min_snr_gamma: DDPM families: Min-SNR-gamma weighting, 5 is the paper's value; empty = off.
        debiased_estimation: DDPM families: weight by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v).
        prior_weight: Loss weight of regularization images (kohya's ``prior_loss_weight``).
        weighting: Flow families: per-sigma weights as SD3's trainers apply them: ``none``,
            ``sigma_sqrt`` (1/sigma^2), ``cosmap``.
        mask_floor: Images with a loss mask (``<stem>_mask.png`` beside the image, or
            ``data.alpha_mask``): the loss weight where the mask is black; white counts 1, grey in
            between. 0 learns only the masked subject (kohya's ``masked_loss``), 1 ignores masks
            (OneTrainer's ``unmasked_weight``).
        mask_normalize: Divide each masked sample's loss by its mean weight, so a small subject
            weighs as much as a large one (OneTrainer's ``normalize_masked_area_loss``).
    """

    type: LossType = "l2"
    huber_schedule: HuberSchedule = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    prior_weight: float = 1.0
    weighting: FlowWeighting = "none"
    mask_floor: float = 0.0
    mask_normalize: bool = False


@dataclass(frozen=True)
class ConditioningConfig(TextOptions):
    """Captions to conditioning; see :class:`lorafit.families.family.TextOptions` for each field.

    Args:
        clip_skip: SD1/SD2: use the hidden state this many layers from the end (2 = A1111 "clip skip 2").
        max_token_length: CLIP families: kohya's 150/225 caption tokens in 75-token chunks; empty = 75.
        max_sequence_length: Flux: T5 tokens per caption; empty = 512 for [dev], 256 for [schnell] (at most
            the T5 tokenizer's ``model_max_length``: 16 for the toy Flux base). Qwen-Image / Z-Image /
            FLUX.2 [klein]: the LLM's caption budget; empty = 1024 / 512 / 512.
        guidance: Guidance-distilled models (Flux.1 [dev]): the guidance value during training (1.0
            as kohya, ai-toolkit and SimpleTuner train).
    """


@dataclass(frozen=True)
class MemoryConfig:
    """Speed and memory of the step.

    Args:
        gradient_checkpointing: Recompute activations in the backward pass of the denoiser and the
            trained text encoders: much less activation memory for one extra forward pass.
        channels_last: UNets: store weights and activations channels-last (tensor cores run
            convolutions fastest in it; mostly pays for SD1.5).
        compile: ``torch.compile`` the denoiser after the adapters are attached.
    """

    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class PriorConfig:
    """Output-preserving prior: ai-toolkit's "differential output preservation" (docs/teaching-methods.md).

    Each step also predicts, on the same noisy latents, with the caption's trigger replaced by the
    class word ("ohwx dog" -> "dog"), once with the LoRA and once with it off (the base model), and
    adds ``weight x`` the squared difference: the LoRA learns the subject while the class stays what
    the base model draws, without a folder of regularization images.

    Args:
        weight: Weight of that term (ai-toolkit's ``diff_output_preservation_multiplier``, 1.0 there);
            0 = off.
        class_word: What the trigger becomes in the preserved prompts (ai-toolkit's
            ``diff_output_preservation_class``), e.g. ``dog`` or ``woman``.
        trigger: The word(s) replaced (whole words only); empty = ``data.trigger_word``.
    """

    weight: float = 0.0
    class_word: str | None = None
    trigger: str | None = None


@dataclass(frozen=True)
class EmbeddingConfig:
    """Textual inversion: new token embeddings trained for the trigger; with a LoRA, pivotal tuning.

    The token gets trained vectors in every CLIP text encoder of the family (SD1/SD2: one, SDXL:
    CLIP-L and OpenCLIP bigG); the rest of each embedding matrix stays frozen. Exported as A1111 /
    ComfyUI embedding files and diffusers' ``load_textual_inversion`` format, and inside the kohya
    LoRA file as A1111's ``bundle_emb`` keys (docs/teaching-methods.md). Textual inversion alone:
    set ``model.optimizer.denoiser_lr 0`` (no LoRA). Not for Flux and later families (their prompt
    reaches the model through T5 or an LLM).

    Args:
        token: The new word, written in the captions where the subject is named (A1111's embedding
            name, diffusers' placeholder token), e.g. ``ohwx``; lowercase, one word, not already a
            single token of the vocabulary. Empty = no textual inversion.
        init_word: Word(s) whose token embeddings the vectors start from (A1111's initialization
            text, diffusers' ``initializer_token``), e.g. the class ``dog``: vector i starts as the
            init word's token ``i * k // vectors`` of its k tokens. Empty = the mean of the vocabulary's
            embeddings (a neutral start).
        vectors: Vectors per token (A1111's "number of vectors per token"); the token stands for
            that many prompt tokens (``ohwx ohwx_1 ...``, as diffusers' loader expands it).
        learning_rate: Learning rate of the vectors; empty = ``model.optimizer.learning_rate``.
            Textual inversion usually wants 1e-3 to 5e-3 (A1111's default 5e-3), far above a LoRA's.
        freeze_after: Pivotal tuning: optimizer steps the vectors train for; after them they stay
            fixed while the LoRA trains on. Empty = train throughout.
    """

    token: str | None = None
    init_word: str | None = None
    vectors: int = 1
    learning_rate: float | None = None
    freeze_after: int | None = None


@dataclass(frozen=True)
class SliderConfig:
    """Concept slider: a LoRA that moves one attribute both ways (Gandikota et al., "Concept Sliders";
    ai-toolkit's slider trainer; docs/teaching-methods.md).

    The training pictures only supply noisy latents. At each step the frozen base predicts them for
    the positive, negative and neutral prompts; the LoRA at strength +1 learns
    ``neutral + guidance x (positive - negative)`` on the neutral prompt, at strength -1 the
    opposite, so the file is used from -N to +N (``lorafit grid --strength -2 ... --strength 2``).

    Args:
        positive: The prompt of the "more" end, e.g. ``a photo of a person, smiling``; empty = off.
        negative: The prompt of the "less" end, e.g. ``a photo of a person, frowning`` (the same
            prompt but for the attribute works best: everything else cancels).
        target: The neutral prompt the slider acts on (ai-toolkit's ``target_class``, e.g.
            ``a photo of a person``); empty = each training picture's own caption.
        guidance: How far strength 1 moves along positive - negative (ai-toolkit's
            ``guidance_strength``, 3 there; the paper's eta).
        normalize: Rescale each target to the neutral prediction's mean and standard deviation (per
            sample), as ai-toolkit does, so a large ``guidance`` cannot ask for out-of-range noise.
        anchor: A prompt the slider must leave as the base draws it at either strength (ai-toolkit's
            ``anchor_class``); empty = none.
        anchor_weight: Weight of the anchor's preservation term (ai-toolkit's ``anchor_strength``).
        image_pairs: Train from picture pairs instead of a prompt pair: each training picture holds
            two side by side, the left one "less", the right one "more" (ai-toolkit's image
            reference slider); the LoRA learns the right half at +1 and the left at -1, same noise,
            each picture's caption as the prompt. Leave positive/negative empty; no flips or random crops.
    """

    positive: str | None = None
    negative: str | None = None
    target: str | None = None
    guidance: float = 3.0
    normalize: bool = True
    anchor: str | None = None
    anchor_weight: float = 1.0
    image_pairs: bool = False
