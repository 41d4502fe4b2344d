"""LoraDiffusionModule: a frozen diffusion model (UNet or transformer) with trainable adapters.

Orchestration only. The family (:mod:`lorafit.families`) loads the model and says how it is
conditioned and called; the step (:mod:`~lorafit.training.step`) computes the loss with the
family's objective (:mod:`~lorafit.training.ddpm`, :mod:`~lorafit.training.flow_matching`);
adapters come from :mod:`lorafit.networks`; the NaN/Inf guard is a callback
(:mod:`~lorafit.training.nonfinite`); what a checkpoint holds is in
:mod:`~lorafit.training.checkpoint_state`; the settings are typed groups (:mod:`~lorafit.training.config`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lorafit.distributed.collectives import all_reduce_in_place, logged_this_step
from lorafit.errors import LorafitError
from lorafit.families.family import BaseModel
from lorafit.families.loading import DTYPES, PredictionType, Quantization, load_base_model, resolve_model_source
from lorafit.families.registry import get_family
from lorafit.networks.adapters import ADAPTER_NAME
from lorafit.networks.lora_weights import LoraWeights
from lorafit.networks.network_types import NetworkSpec
from lorafit.networks.peft_layers import from_peft_model
from lorafit.training import checkpoint_state
from lorafit.training.adapter_setup import attach_adapters
from lorafit.training.config import (
    ConditioningConfig,
    EmbeddingConfig,
    LossConfig,
    MemoryConfig,
    NetworkConfig,
    NoiseConfig,
    OptimizerConfig,
    PriorConfig,
    SliderConfig,
)
from lorafit.training.garbage_collection import SetupObjectsFrozen
from lorafit.training.host_parts import HostParts, note_resident_text_encoders
from lorafit.training.legacy_keys import settings_groups
from lorafit.training.nonfinite import NonfiniteGuard
from lorafit.training.optim import effective_learning_rates, lightning_optimizers, part_learning_rates
from lorafit.training.output_prior import output_prior
from lorafit.training.settings_checks import check_objective_settings, check_prior, check_settings
from lorafit.training.slider import check_slider, concept_slider
from lorafit.training.speed import apply_speed_settings
from lorafit.training.step import DenoisingStep, check_cached_shards, step_seed
from lorafit.training.token_embeddings import EmbeddingFreeze, check_embedding, trained_tokens

log = logging.getLogger("lorafit.train")

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class LoraDiffusionModule(pl.LightningModule):
    """Train LoRA adapters (LoCon, LoHa, LoKr, DoRA) on a frozen SD1.x / SD2.x / SDXL / Flux.1 model.

    Args:
        model: Base model: a diffusers pipeline directory, a hub id (``org/name``) or a
            ``.safetensors``/``.ckpt`` single file (Flux: the BFL transformer file, with ``parts``).
        family: Override the detected family (``sd1``, ``sd2``, ``sdxl``, ``flux``); normally empty.
        prediction_type: UNet families: override the scheduler's (``epsilon``, ``v_prediction``).
        single_file_config: For single files: a diffusers pipeline directory or hub id of the same
            architecture whose configs describe the file (needed offline).
        parts: Single files: separately downloaded components by diffusers name, e.g. for Flux
            ``{vae: ae.safetensors, text_encoder: clip_l.safetensors, text_encoder_2: t5xxl_fp16.safetensors}``.
        revision: Hub revision of ``model`` (branch, tag or commit hash).
        variant: Hub weight variant of ``model``, e.g. ``fp16``.
        weight_dtype: dtype of the frozen base weights; adapter weights always train in float32.
        vae_dtype: dtype of the VAE; empty = ``weight_dtype``, except float32 when that is float16
            (SD VAEs overflow in fp16; kohya's ``no_half_vae``). The VAE never runs under autocast.
        quantization: Storage of the frozen denoiser: ``none``; ``nf4``/``int8`` (bitsandbytes,
            through diffusers' quantization config, for cards of 8-16 GB); ``fp8`` (float8 weights
            upcast per layer).
        network: The adapter (``model.network.*``).
        optimizer: Optimizer and learning-rate schedule (``model.optimizer.*``).
        noise: Noise and timesteps/sigmas (``model.noise.*``).
        loss: Loss type and weights (``model.loss.*``).
        conditioning: Captions to conditioning (``model.conditioning.*``).
        memory: Gradient checkpointing, channels-last, compile (``model.memory.*``).
        prior: Output-preserving prior: the base model's prediction on the class prompt as a second
            target, instead of (or with) regularization images (``model.prior.*``).
        embedding: Textual inversion / pivotal tuning: trained vectors for a new token in the text
            encoders (``model.embedding.*``).
        slider: Concept slider: a LoRA trained at +1 and -1 from a positive/negative prompt pair,
            used from -N to +N (``model.slider.*``).
        nonfinite_loss: On a NaN/Inf loss: ``stop`` the run with a message naming the step and
            images (checked a step late, so the GPU never waits) or ``skip`` the batch (one device
            only; one host sync per step).
        **legacy: The flat keys of earlier versions (``rank=8``, ``min_snr_gamma=5``), mapped onto
            the groups with a notice; see lorafit/training/legacy_keys.py.
    """

    def __init__(
        self,
        model: str,
        family: str | None = None,
        prediction_type: PredictionType | None = None,
        single_file_config: str | None = None,
        parts: dict[str, str] | None = None,
        revision: str | None = None,
        variant: str | None = None,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        vae_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        quantization: Quantization = "none",
        network: NetworkConfig = NetworkConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        noise: NoiseConfig = NoiseConfig(),
        loss: LossConfig = LossConfig(),
        conditioning: ConditioningConfig = ConditioningConfig(),
        memory: MemoryConfig = MemoryConfig(),
        prior: PriorConfig = PriorConfig(),
        embedding: EmbeddingConfig = EmbeddingConfig(),
        slider: SliderConfig = SliderConfig(),
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        **legacy: Any,
    ):
        super().__init__()
        if isinstance(optimizer, str):  # the old `optimizer: AdamW` (a name) is now optimizer.name
            legacy, optimizer = {**legacy, "optimizer": optimizer}, OptimizerConfig()
        groups = settings_groups(
            {
                "network": network,
                "optimizer": optimizer,
                "noise": noise,
                "loss": loss,
                "conditioning": conditioning,
                "memory": memory,
                "prior": prior,
                "embedding": embedding,
                "slider": slider,
            },
            legacy,
        )
        self.network, self.optimizer_config = groups["network"], groups["optimizer"]
        self.noise, self.loss_config = groups["noise"], groups["loss"]
        self.conditioning_config, self.memory = groups["conditioning"], groups["memory"]
        self.prior_config, self.slider_config = groups["prior"], groups["slider"]
        check_settings(self.network, self.optimizer_config, self.noise, self.loss_config, self.conditioning_config)
        check_prior(self.prior_config)
        self.embedding = groups["embedding"]
        check_embedding(self.embedding)
        self.trained_tokens = None  # textual inversion's vectors (token_embeddings.py), built with the model
        check_slider(self.slider_config, self.network, self.memory, self.prior_config)
        # Plain types only: checkpoints are loaded with weights_only, which refuses dataclasses.
        self.save_hyperparameters(
            {
                "model": model,
                "family": family,
                "prediction_type": prediction_type,
                "single_file_config": single_file_config,
                "parts": dict(parts or {}),
                "revision": revision,
                "variant": variant,
                "weight_dtype": weight_dtype,
                "vae_dtype": vae_dtype,
                "quantization": quantization,
                "nonfinite_loss": nonfinite_loss,
                **{name: dataclasses.asdict(value) for name, value in groups.items()},
            }
        )
        resolve_model_source(model)  # a bad path fails here, before any weights are read
        self.base: BaseModel | None = None
        self.step: DenoisingStep | None = None
        self.objective = None
        self.text_encoders = torch.nn.ModuleList()
        self.host_parts = HostParts(self)
        self.nonfinite = NonfiniteGuard(nonfinite_loss)
        self.noise_seed: int | None = None
        self.started_at = time.time()
        # Checkpoints hold only the adapter weights (checkpoint_state.py), so loading them must not
        # demand the frozen base weights.
        self.strict_loading = False

    # ---- model construction -------------------------------------------------------------

    def configure_model(self) -> None:
        if self.base is not None:  # Lightning may call this more than once
            return
        base = self.load_base()
        spec = get_family(base.family)
        check_objective_settings(spec.objective, spec.title, self.noise, self.loss_config, self.network)
        self.base, self.spec = base, spec
        setattr(self, spec.denoiser_component, base.denoiser)  # `unet` / `transformer`: checkpoint key names
        self.vae = base.vae
        if self.vae.dtype != DTYPES[self.vae_dtype]:  # diffusers warns on any .to(dtype), even a no-op
            self.vae.to(DTYPES[self.vae_dtype])
        self.text_encoders = torch.nn.ModuleList(base.text_encoders)
        self.objective = self._objective(spec, base)
        rates = self.learning_rates()
        if not any(rate > 0 for rate in rates.values()):
            raise LorafitError(f"model.optimizer: every learning rate is 0 ({rates}); nothing would train")
        # Parts with learning rate 0 get no adapter at all: frozen, absent from checkpoints and exports.
        attach_adapters(base, spec, self.network, rates, self.trained_text_encoders(), self.conditioning_config)
        self.trained_tokens = trained_tokens(self.embedding, base, spec)
        trains_text = bool(self.trained_text_encoders()) or self.trained_tokens is not None
        apply_speed_settings(
            base.denoiser,
            self.trained_text_encoders().values(),
            self.memory.gradient_checkpointing,
            self.memory.channels_last,
            self.memory.compile,
        )
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        self.step = DenoisingStep(
            base,
            spec,
            self.objective,
            self.conditioning_config,
            trains_text=trains_text,
            prior=output_prior(self.prior_config, datamodule),
            adapted=list(self.lora_components().values()),
            captions=None if self.trained_tokens is None else self.trained_tokens.expand,
            slider=concept_slider(self.slider_config, datamodule),
        )
        if hasattr(datamodule, "unused_model_parts"):  # before Lightning moves the module to the device
            self.host_parts.park(datamodule.unused_model_parts(), trains_text)
        note_resident_text_encoders(base.text_encoders, self.host_parts.names, flow=spec.objective == "flow")

    def _objective(self, spec, base: BaseModel):
        if spec.objective == "flow":
            from lorafit.training.flow_matching import FlowMatchingObjective

            return FlowMatchingObjective(spec, base.scheduler_config, self.noise, self.loss_config)
        from lorafit.training.ddpm import DDPMObjective

        return DDPMObjective(base.scheduler_config, base.prediction_type, self.noise, self.loss_config)

    def load_base(self) -> BaseModel:
        """The frozen base model named by ``model`` (tools/bench.py builds one from configs instead)."""
        hp = self.hparams
        return load_base_model(
            hp.model,
            hp.family,
            hp.prediction_type,
            hp.single_file_config,
            hp.weight_dtype,
            hp.revision,
            hp.variant,
            hp.parts,
            hp.quantization,
        )

    def network_spec(self) -> NetworkSpec:
        return self.network.adapter_spec()

    @property
    def family(self) -> str:
        return self.base.family

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.base.denoiser

    @property
    def vae_dtype(self) -> str:
        hp = self.hparams
        if hp.vae_dtype:
            return hp.vae_dtype
        return "float32" if hp.weight_dtype == "float16" else hp.weight_dtype

    def learning_rates(self) -> dict[str, float]:
        """Learning rate of each part that may train (``unet``/``transformer``, text encoders); 0 = frozen."""
        spec = self.spec if self.base is not None else None
        text_encoders = ()
        if self.network.train_text_encoder:
            trainable = spec.trainable_text_encoders if spec else TEXT_ENCODER_NAMES
            present = TEXT_ENCODER_NAMES[: len(self.text_encoders)] if len(self.text_encoders) else TEXT_ENCODER_NAMES
            text_encoders = tuple(n for n in present if n in trainable)
        embedding = None if self.embedding.token is None else (self.embedding.learning_rate or 0.0)
        return part_learning_rates(
            self.optimizer_config, spec.denoiser_component if spec else "unet", text_encoders, embedding
        )

    def trained_text_encoders(self) -> dict[str, torch.nn.Module]:
        rates = self.learning_rates()
        return {name: enc for name, enc in zip(TEXT_ENCODER_NAMES, self.text_encoders) if rates.get(name, 0) > 0}

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The adapted modules by diffusers component name (``unet``/``transformer``, ``text_encoder``, ...)."""
        name = self.spec.denoiser_component
        components = {name: self.denoiser} if self.learning_rates()[name] > 0 else {}
        components.update(self.trained_text_encoders())
        return components

    def lora_weights(self) -> LoraWeights:
        return from_peft_model(self.lora_components(), ADAPTER_NAME)

    # ---- what callbacks and tests use ------------------------------------------------------

    def configure_callbacks(self):
        # Lightning asks before configure_model: EmbeddingFreeze finds the vectors on the module later.
        after = self.embedding.freeze_after if self.embedding.token is not None else None
        return [self.nonfinite, SetupObjectsFrozen(), *([EmbeddingFreeze(after)] if after is not None else [])]

    def ensure_finite(self) -> None:
        """Wait for every NaN/Inf check up to now; raise before any file would be written."""
        self.nonfinite.ensure_finite(self)

    def host_parts_on_device(self, names=None):
        """The parts kept on the host (cached data), or only ``names`` of them, on the training device
        for a sample round (then back)."""
        return self.host_parts.on_device(self.device, names)

    def denoising_loss(self, batch: dict, generator: torch.Generator, timesteps=None, noise=None) -> torch.Tensor:
        fixed = None if timesteps is None else (noise, timesteps)
        return self.step.loss(batch, generator, self.device, self.training, fixed)

    def text_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.step.conditioning(batch, self.device, self.training)

    def check_cache(self, cached: dict | None) -> None:
        check_cached_shards(cached, self.spec, self.base, self.conditioning_config, self.hparams.model)
        if self.step.prior is not None:
            self.step.prior.check_cache(cached)
        if self.trained_tokens is not None:
            self.trained_tokens.check_cache(cached)
        if self.step.slider is not None:
            self.step.slider.check_cache(cached)

    def fixed_noise(self, batch: dict, batch_idx: int):
        return self.step.fixed_points(batch, batch_idx, self.device)

    # ---- training -----------------------------------------------------------------------

    def _generator(self, batch: dict, batch_idx: int) -> torch.Generator:
        # A global batch (data.global_batch) is one draw shared by all ranks, each keeping its rows.
        slot = 0 if "global_rows" in batch else self.global_rank
        seed = step_seed(self.noise_seed, self.current_epoch, batch_idx, slot)
        return torch.Generator(device=self.device).manual_seed(seed)

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
        if not self.nonfinite.watch_loss(self, loss, batch, batch_idx):
            return None
        if not logged_this_step(self.trainer):  # the values below are for the loggers only
            return loss
        # The mean over all ranks' samples, i.e. the global batch's loss; reduced without Lightning's
        # sync_dist, whose barrier would stall every step (collectives.py). Only loggers read it.
        self.log("loss/current", all_reduce_in_place(loss.detach().clone(), "mean"), batch_size=batch_size)
        if self.step.last_prior is not None:  # the output-preserving prior's part of it
            self.log("loss/prior", all_reduce_in_place(self.step.last_prior.clone(), "mean"), batch_size=batch_size)
        rates = effective_learning_rates(self.trainer.optimizers[0])
        # Host tensors: Lightning would copy a Python float to the GPU, waiting for the queue.
        self.log_dict(
            {f"lr/{_LOG_NAME.get(n, n)}": torch.tensor(r) for n, r in rates.items()},
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
        opt = self.optimizer_config
        parts = {self.spec.denoiser_component: self.denoiser, **dict(zip(TEXT_ENCODER_NAMES, self.text_encoders))}
        parts["embedding"] = self.trained_tokens
        groups = [
            {"name": name, "lr": rate, "params": [p for p in parts[name].parameters() if p.requires_grad]}
            for name, rate in self.learning_rates().items()
            if rate > 0
        ]
        # The data module counts every epoch's batches; Lightning multiplies the first epoch's by max_epochs.
        planned = getattr(getattr(self.trainer, "datamodule", None), "stepping_batches", lambda: None)()
        return lightning_optimizers(opt, groups, planned or self.trainer.estimated_stepping_batches)

    # ---- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_state.save(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_state.load(self, checkpoint)


# Logged learning-rate names, as kohya logs them (and the guides read them in TensorBoard).
_LOG_NAME = {"text_encoder": "textencoder", "text_encoder_2": "textencoder2"}
