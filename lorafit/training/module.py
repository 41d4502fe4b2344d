"""LoraDiffusionModule: a frozen Stable Diffusion model with trainable LoRA adapters.

Orchestration only: loading lives in ``models/``, adapters in ``networks/``, the denoising step
(encode, noise, predict, regress onto the family's target) in ``denoising.py``, the NaN/Inf guard
in ``nonfinite.py`` and what a checkpoint holds in ``checkpoint_state.py``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lorafit.distributed.collectives import all_reduce_in_place
from lorafit.errors import LorafitError
from lorafit.families.loading import (
    DTYPES,
    BaseModel,
    Family,
    PredictionType,
    load_base_model,
    resolve_model_source,
)
from lorafit.networks.adapters import ADAPTER_NAME, DEFAULT_TEXT_ENCODER_TARGETS, attach_network
from lorafit.networks.lora_weights import LoraWeights
from lorafit.networks.network_types import NetworkSpec, NetworkType
from lorafit.networks.peft_layers import from_peft_model
from lorafit.networks.presets import TargetPreset, preset_modules
from lorafit.training import losses
from lorafit.training.checkpoint_state import LoraCheckpointState
from lorafit.training.denoising import DenoisingStep
from lorafit.training.host_parts import HostParts
from lorafit.training.nonfinite import NonfiniteGuard
from lorafit.training.optim import (
    OptimizerName,
    SchedulerName,
    build_optimizer,
    build_scheduler,
    effective_learning_rates,
    optimizer_kwargs,
)
from lorafit.training.speed import apply_speed_settings
from lorafit.training.text_encoders import freeze_unread_text_lora

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
# Logged learning-rate names, as kohya logs them (and the guides read them in TensorBoard).
LR_LOG_NAMES = {"unet": "lr/unet", "text_encoder": "lr/textencoder", "text_encoder_2": "lr/textencoder2"}


class LoraDiffusionModule(DenoisingStep, NonfiniteGuard, LoraCheckpointState, HostParts, pl.LightningModule):
    """Train LoRA adapters on a frozen SD1.x / SD2.x / SDXL model.

    Args:
        model: Base model: a diffusers pipeline directory, a hub id (``org/name``) or a
            ``.safetensors``/``.ckpt`` single file.
        family: Override the detected family (``sd1``, ``sd2``, ``sdxl``); normally left empty.
        prediction_type: Override the scheduler's prediction type (``epsilon``, ``v_prediction``).
        single_file_config: For single files: a diffusers pipeline directory or hub id of the same
            architecture whose configs describe the file (needed offline).
        revision: Hub revision of ``model`` (branch, tag or commit hash).
        variant: Hub weight variant of ``model``, e.g. ``fp16``.
        weight_dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``).
            LoRA weights always train in float32.
        rank: LoRA rank (kohya's ``network_dim``).
        alpha: LoRA alpha (kohya's ``network_alpha``); the update is scaled by ``alpha / rank``.
            Empty means ``alpha = rank`` (scale 1). kohya's default is 1.
        unet_target_modules: UNet modules to adapt, overriding ``target_preset``: a list of name
            suffixes or one full-match regex. Empty means the preset decides.
        train_text_encoder: Also train the network on the text encoder(s).
        text_encoder_target_modules: Text-encoder modules to adapt (suffixes or a regex).
        network_type: ``lora``; ``locon`` (LoRA also on ResNet/Down/Upsample convs, kohya's
            ``conv_dim``); ``loha``, ``lokr`` (LyCORIS ``algo``); ``dora`` (LoRA with learnt
            per-channel magnitude, LyCORIS ``dora_wd``). See docs/network-types.md.
        target_preset: UNet modules to adapt: ``attn`` (attention projections), ``attn-mlp``
            (all linears of the transformer blocks, kohya's default) or ``full`` (also ResNet
            convs, conv_in/out and time embedding, LyCORIS's ``full``).
        include: Extra modules to adapt: regexes matched against module names (a name matches
            when it equals the pattern or ends in ``.`` + pattern), UNet and text encoders.
        exclude: Modules not to adapt, regexes as for ``include`` (applied last).
        conv_rank: Rank of convolutions with kernels larger than 1x1 (kohya's ``conv_dim``);
            empty means ``rank``.
        conv_alpha: Alpha of those convolutions (kohya's ``conv_alpha``, whose default is 1);
            empty means scale 1 (alpha = the conv's rank) when ``conv_rank`` is set, else ``alpha``.
        rank_pattern: Rank per module, ``{regex: rank}``, e.g. ``{"up_blocks\\.0\\..*": 32}``;
            the first matching regex wins over ``rank``/``conv_rank`` (kohya's block dims).
        alpha_pattern: Alpha per module, ``{regex: alpha}``, as ``rank_pattern``.
        lokr_factor: LoKr only: the Kronecker factor size (LyCORIS's ``factor``); -1 = as square as possible.
        learning_rate: Base learning rate (kohya's ``learning_rate``), used by every part whose own
            rate (``unet_lr``, ``text_encoder_lr``) is empty.
        text_encoder_lr: Learning rate of the (first) text encoder's LoRA (kohya's
            ``text_encoder_lr``); empty means ``learning_rate``, 0 leaves it without LoRA, frozen.
        weight_decay: Weight decay; empty keeps the optimizer's default (AdamW 0.01, others 0).
        betas: Optimizer betas (AdamW, Lion, Prodigy); empty keeps the optimizer's default.
        clip_skip: SD1/SD2: use the hidden state this many layers from the end (2 = A1111 "clip
            skip 2"). SDXL always uses the penultimate layer.
        max_token_length: kohya's ``max_token_length``: caption tokens read (150 or 225) instead of
            CLIP's 75, encoded in 75-token chunks whose hidden states are joined (kohya's method;
            A1111 and ComfyUI join chunks at generation time). Empty: longer captions are cut at 75.
        unet_lr: Learning rate of the UNet LoRA (kohya's ``unet_lr``); empty means ``learning_rate``,
            0 leaves the UNet without LoRA (text-encoder-only training).
        text_encoder_2_lr: SDXL: learning rate of the second text encoder (OpenCLIP bigG); empty
            means ``text_encoder_lr``, 0 leaves it frozen.
        optimizer: kohya's ``optimizer_type``: ``AdamW``, ``AdamW8bit``/``Lion8bit`` (bitsandbytes),
            ``Adafactor`` (transformers), ``Prodigy`` (prodigyopt; use learning rates near 1.0),
            ``Lion`` (lion-pytorch; ~3-10x lower learning rate than AdamW).
        optimizer_args: Extra constructor arguments (kohya's ``optimizer_args``), e.g. for Adafactor
            ``{scale_parameter: false, relative_step: false, warmup_init: false}``, for Prodigy
            ``{d_coef: 2, use_bias_correction: true}``, for AdamW ``{eps: 1.0e-8}``.
        lr_scheduler: Learning-rate schedule (diffusers/kohya names), stepped per optimizer step.
        lr_warmup_steps: Linear warmup length: optimizer steps if >= 1, a fraction of the run if < 1.
        lr_scheduler_num_cycles: Hard restarts of ``cosine_with_restarts`` (kohya's ``lr_scheduler_num_cycles``).
        lr_scheduler_power: Exponent of ``polynomial`` decay (kohya's ``lr_scheduler_power``).
        noise_offset: Offset noise strength, ~0.05-0.1 (kohya's ``noise_offset``): lets the model
            learn very dark or bright images.
        noise_offset_random_strength: Scale the offset by a uniform [0, 1) draw per batch.
        multires_noise_iterations: Pyramid (multi-resolution) noise levels, ~6-10; 0 = off.
        multires_noise_discount: Weight decay per pyramid level (kohya's default 0.3).
        ip_noise_gamma: Input-perturbation noise strength, ~0.1 (kohya's ``ip_noise_gamma``).
        ip_noise_gamma_random_strength: Scale ``ip_noise_gamma`` by a uniform [0, 1) draw per batch.
        min_snr_gamma: Min-SNR-gamma loss weighting, 5 is the paper's value; empty = off.
        debiased_estimation_loss: Weight the loss by 1/sqrt(SNR) (eps) or 1/(SNR+1) (v-prediction).
        zero_terminal_snr: Rescale the noise schedule to zero SNR at the last timestep (Lin et al.
            2023); needs a v-prediction model (``prediction_type``).
        min_timestep: Smallest training timestep (inclusive).
        max_timestep: Largest training timestep (exclusive); empty = the schedule's length (1000).
        loss_type: ``l2`` (MSE), ``l1``, ``huber`` or ``smooth_l1`` (kohya's pseudo-Huber forms).
        huber_schedule: How the Huber ``c`` varies with the timestep: ``constant``, ``exponential``, ``snr``.
        huber_c: Huber ``c`` (kohya's ``huber_c``).
        huber_scale: Multiplies ``c`` in the constant and exponential schedules (kohya's ``huber_scale``).
        prior_loss_weight: Loss weight of regularization images (batch ``is_reg``), kohya's ``prior_loss_weight``.
        gradient_checkpointing: Recompute activations in the backward pass of the UNet and the trained
            text encoders: much less activation memory for one extra forward pass per step.
        vae_dtype: dtype of the VAE; empty means ``weight_dtype``, except float32 when that is float16
            (SD VAEs overflow in fp16; kohya's ``no_half_vae``). The VAE never runs under autocast.
        channels_last: Store the UNet's weights and activations channels-last, the layout GPU
            tensor cores run convolutions fastest in (mostly pays for SD1.5; measure it with
            ``tools/bench.py --channels-last false,true``).
        compile_unet: ``torch.compile`` the UNet (after the LoRA is attached): faster steps on GPU
            after a slow first one.
        nonfinite_loss: On a NaN/Inf loss: ``stop`` the run with a message naming the step and images
            (checked a step late so the GPU never waits; nothing from the bad step is exported) or
            ``skip`` the batch (counted as ``loss/skipped_nonfinite``; one device only; reads every
            loss on the host, one GPU sync per step).
    """

    def __init__(
        self,
        model: str,
        family: Family | None = None,
        prediction_type: PredictionType | None = None,
        single_file_config: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        rank: int = 16,
        alpha: float | None = None,
        unet_target_modules: list[str] | str | None = None,
        train_text_encoder: bool = False,
        text_encoder_target_modules: list[str] | str = DEFAULT_TEXT_ENCODER_TARGETS,
        network_type: NetworkType = "lora",
        target_preset: TargetPreset = "attn",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        conv_rank: int | None = None,
        conv_alpha: float | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        lokr_factor: int = -1,
        learning_rate: float = 1e-4,
        text_encoder_lr: float | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        clip_skip: int = 1,
        max_token_length: int | None = None,
        # ---- training recipe: learning rates, optimizer, schedule
        unet_lr: float | None = None,
        text_encoder_2_lr: float | None = None,
        optimizer: OptimizerName = "AdamW",
        optimizer_args: dict[str, Any] | None = None,
        lr_scheduler: SchedulerName = "constant",
        lr_warmup_steps: float = 0,
        lr_scheduler_num_cycles: int = 1,
        lr_scheduler_power: float = 1.0,
        # ---- training recipe: noise, timesteps, loss
        noise_offset: float = 0.0,
        noise_offset_random_strength: bool = False,
        multires_noise_iterations: int = 0,
        multires_noise_discount: float = 0.3,
        ip_noise_gamma: float = 0.0,
        ip_noise_gamma_random_strength: bool = False,
        min_snr_gamma: float | None = None,
        debiased_estimation_loss: bool = False,
        zero_terminal_snr: bool = False,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        loss_type: losses.LossType = "l2",
        huber_schedule: losses.HuberSchedule = "snr",
        huber_c: float = 0.1,
        huber_scale: float = 1.0,
        prior_loss_weight: float = 1.0,
        # ---- training recipe: memory and speed, failure handling
        gradient_checkpointing: bool = False,
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        channels_last: bool = False,
        compile_unet: bool = False,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
    ):
        super().__init__()
        self.save_hyperparameters()
        resolve_model_source(model)  # a bad path fails here, before any weights are read
        self._check_recipe()
        self.base: BaseModel | None = None
        self.unet: torch.nn.Module | None = None
        self.vae: torch.nn.Module | None = None
        self.text_encoders = torch.nn.ModuleList()
        self.noise_scheduler = None
        self.noise_seed: int | None = None
        self.started_at = time.time()
        self.skipped_nonfinite = 0
        # Checkpoints hold only the LoRA weights (see on_save_checkpoint), so loading them must
        # not demand the frozen base weights.
        self.strict_loading = False

    def _check_recipe(self) -> None:
        """Fail on impossible recipe values now, with one line, before any weights are read."""
        hp = self.hparams
        for key in ("learning_rate", "unet_lr", "text_encoder_lr", "text_encoder_2_lr"):
            if (hp[key] or 0) < 0:
                raise LorafitError(f"model.{key}: {hp[key]} is negative; use 0 to freeze that part")
        optimizer_kwargs(hp.optimizer, hp.weight_decay, hp.betas, hp.optimizer_args)  # raises on conflicts
        if hp.min_snr_gamma is not None and hp.min_snr_gamma <= 0:
            raise LorafitError(f"model.min_snr_gamma: {hp.min_snr_gamma} must be > 0 (5 is usual); leave empty for off")
        if hp.loss_type in ("huber", "smooth_l1") and not 0 < hp.huber_c <= 1:
            raise LorafitError(f"model.huber_c: {hp.huber_c} must be in (0, 1]")
        if hp.max_token_length is not None and hp.max_token_length < 1:
            raise LorafitError(
                f"model.max_token_length: {hp.max_token_length}; use 150 or 225, or leave it empty for 75"
            )
        if hp.max_timestep is not None and not 0 <= hp.min_timestep < hp.max_timestep:
            raise LorafitError(f"model.min_timestep/max_timestep: need 0 <= {hp.min_timestep} < {hp.max_timestep}")

    # ---- model construction -------------------------------------------------------------

    def configure_model(self) -> None:
        if self.unet is not None:  # Lightning may call this more than once
            return
        from diffusers import DDPMScheduler

        hp = self.hparams
        base = self.load_base()
        self.base = base
        self.unet, self.vae = base.unet, base.vae
        if self.vae.dtype != DTYPES[self.vae_dtype]:  # diffusers warns on any .to(dtype), even a no-op
            self.vae.to(DTYPES[self.vae_dtype])
        self.text_encoders = torch.nn.ModuleList(base.text_encoders)
        if hp.zero_terminal_snr and base.prediction_type != "v_prediction":
            raise LorafitError(
                "model.zero_terminal_snr needs a v-prediction model (at zero SNR an epsilon model "
                "cannot recover the image); set model.prediction_type: v_prediction or turn it off"
            )
        # Training noise follows the model's own beta schedule; DDPM is the forward process.
        self.noise_scheduler = DDPMScheduler.from_config(
            base.scheduler_config, prediction_type=base.prediction_type, rescale_betas_zero_snr=hp.zero_terminal_snr
        )
        if not 0 <= hp.min_timestep < self.max_timestep <= self.noise_scheduler.config.num_train_timesteps:
            raise LorafitError(
                f"model.min_timestep/max_timestep: need 0 <= {hp.min_timestep} < {self.max_timestep} "
                f"<= {self.noise_scheduler.config.num_train_timesteps}"
            )
        rates = self.learning_rates()
        if not any(rate > 0 for rate in rates.values()):
            raise LorafitError(f"model: every learning rate is 0 ({rates}); nothing would train")
        # Parts with learning rate 0 get no LoRA at all: frozen, absent from checkpoints and exports.
        spec = self.network_spec()
        if rates["unet"] > 0:
            if hp.unet_target_modules is not None:
                unet_targets, key = hp.unet_target_modules, "model.unet_target_modules"
            else:
                unet_targets = preset_modules(self.unet, hp.target_preset, with_conv_blocks=hp.network_type == "locon")
                key = "model.target_preset"
            attach_network(self.unet, spec, unet_targets, hp.include, hp.exclude, key)
        for encoder in self.trained_text_encoders().values():
            attach_network(
                encoder,
                spec,
                hp.text_encoder_target_modules,
                hp.include,
                hp.exclude,
                "model.text_encoder_target_modules",
            )
        self._freeze_unread_text_layers()
        apply_speed_settings(
            self.unet,
            self.trained_text_encoders().values(),
            hp.gradient_checkpointing,
            hp.channels_last,
            hp.compile_unet,
        )
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if hasattr(datamodule, "unused_model_parts"):  # before Lightning moves the module to the device
            self.park_unused_parts(datamodule.unused_model_parts())

    def load_base(self) -> BaseModel:
        """The frozen base model named by ``model`` (tools/bench.py builds one from configs instead)."""
        hp = self.hparams
        return load_base_model(
            hp.model, hp.family, hp.prediction_type, hp.single_file_config, hp.weight_dtype, hp.revision, hp.variant
        )

    def _freeze_unread_text_layers(self) -> None:
        # Left trainable, LoRA that cannot reach the loss stops DDP ("parameters that were not used
        # in producing the loss"); see freeze_unread_text_lora.
        for index, encoder in enumerate(self.text_encoders):
            if encoder in self.trained_text_encoders().values():
                freeze_unread_text_lora(self.family, index, encoder, self.hparams.clip_skip)

    def network_spec(self) -> NetworkSpec:
        hp = self.hparams
        return NetworkSpec(
            hp.network_type,
            hp.rank,
            hp.alpha,
            hp.conv_rank,
            hp.conv_alpha,
            dict(hp.rank_pattern or {}),
            dict(hp.alpha_pattern or {}),
            hp.lokr_factor,
        )

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def vae_dtype(self) -> str:
        hp = self.hparams
        if hp.vae_dtype:
            return hp.vae_dtype
        return "float32" if hp.weight_dtype == "float16" else hp.weight_dtype

    @property
    def max_timestep(self) -> int:
        configured = self.hparams.max_timestep
        return self.noise_scheduler.config.num_train_timesteps if configured is None else configured

    def learning_rates(self) -> dict[str, float]:
        """Learning rate of each part that may train (``unet``, ``text_encoder``, ``text_encoder_2``); 0 = frozen."""
        hp = self.hparams
        rates = {"unet": hp.learning_rate if hp.unet_lr is None else hp.unet_lr}
        if hp.train_text_encoder:
            first = hp.learning_rate if hp.text_encoder_lr is None else hp.text_encoder_lr
            second = first if hp.text_encoder_2_lr is None else hp.text_encoder_2_lr
            rates.update(zip(TEXT_ENCODER_NAMES, (first, second)[: len(self.text_encoders)]))
        return rates

    def trained_text_encoders(self) -> dict[str, torch.nn.Module]:
        rates = self.learning_rates()
        return {
            name: encoder for name, encoder in zip(TEXT_ENCODER_NAMES, self.text_encoders) if rates.get(name, 0) > 0
        }

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The adapted modules by diffusers component name (``unet``, ``text_encoder``, ...)."""
        components = {"unet": self.unet} if self.learning_rates()["unet"] > 0 else {}
        components.update(self.trained_text_encoders())
        return components

    def lora_weights(self) -> LoraWeights:
        return from_peft_model(self.lora_components(), ADAPTER_NAME)

    # ---- training -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.noise_seed is None:  # restored from the checkpoint on resume
            self.noise_seed = torch.initial_seed()
        if self.hparams.nonfinite_loss == "skip" and self.trainer.world_size > 1:
            raise LorafitError(
                "model.nonfinite_loss: skip works on one device only (Lightning cannot skip a batch "
                "on one rank of several); use stop"
            )

    def on_fit_start(self) -> None:
        self.check_cache(getattr(self.trainer.datamodule, "cached", None))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self.denoising_loss(batch, self._generator(batch, batch_idx))
        batch_size = len(batch["captions"])
        if not self._watch_loss(loss, batch, batch_idx):
            return None
        # The mean over all ranks' samples, i.e. the global batch's loss; reduced without Lightning's
        # sync_dist, whose barrier would stall every step (collectives.py). Only loggers read it (every
        # trainer.log_every_n_steps); the progress bar shows a host copy (NonfiniteGuard).
        self.log("loss/current", all_reduce_in_place(loss.detach().clone(), "mean"), batch_size=batch_size)
        rates = effective_learning_rates(self.trainer.optimizers[0])
        # Host tensors: Lightning would copy a Python float to the GPU, waiting for the queue.
        self.log_dict(
            {LR_LOG_NAMES[name]: torch.tensor(rate) for name, rate in rates.items()},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        noise, timesteps, generator = self.fixed_noise(batch, batch_idx)
        loss = self.denoising_loss(batch, generator, timesteps=timesteps, noise=noise)
        self.log("loss/validation", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["captions"]))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        parts = {"unet": self.unet, **dict(zip(TEXT_ENCODER_NAMES, self.text_encoders))}
        groups = [
            {"name": name, "lr": rate, "params": [p for p in parts[name].parameters() if p.requires_grad]}
            for name, rate in self.learning_rates().items()
            if rate > 0
        ]
        kwargs = optimizer_kwargs(hp.optimizer, hp.weight_decay, hp.betas, hp.optimizer_args)
        optimizer = build_optimizer(hp.optimizer, groups, hp.learning_rate, kwargs)
        # The data module counts every epoch's batches; Lightning multiplies the first epoch's by max_epochs.
        planned = getattr(getattr(self.trainer, "datamodule", None), "stepping_batches", lambda: None)()
        scheduler = build_scheduler(
            hp.lr_scheduler,
            optimizer,
            planned or self.trainer.estimated_stepping_batches,
            hp.lr_warmup_steps,
            hp.lr_scheduler_num_cycles,
            hp.lr_scheduler_power,
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
