"""Export the LoRA during training: kohya and diffusers files every N epochs/steps and at the end.

Saving every epoch is what makes the guides' "flexibility vs fidelity" choice possible: the user
compares epochs afterwards and keeps the one that balances both.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch

from lorafit.networks.diffusers_format import diffusers_can_hold
from lorafit.networks.embedding_files import bundle_tensors, save_embedding_files
from lorafit.networks.files import DIFFUSERS_KINDS, save_diffusers, save_kohya
from lorafit.networks.lora_weights import network_kinds
from lorafit.networks.metadata import TrainingInfo, kohya_metadata
from lorafit.networks.network_types import KOHYA_NETWORK_MODULE

log = logging.getLogger("lorafit.export")

# kohya's save_precision spellings (float, fp16, bf16) are accepted too.
SAVE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class LoraExport(pl.Callback):
    """Write ``lora/<name>-epoch-NNN.safetensors`` (kohya) and ``lora/diffusers/<name>-epoch-NNN.safetensors``.

    Args:
        name: Output name (kohya's ``output_name``); files are ``<name>-epoch-NNN.safetensors``,
            ``<name>-step-NNNNNN.safetensors`` and, at the end, ``<name>.safetensors``.
        every_n_epochs: Export after every this many epochs (0 = never by epoch).
        every_n_steps: Export after every this many optimizer steps (0 = never by step).
        save_dtype: dtype of the tensors in the files (kohya's ``save_precision``; its spellings
            ``float``/``fp16``/``bf16`` work too). LoRA weights train in float32 whatever this is.
        formats: Which formats to write: ``kohya`` (kohya/LyCORIS keys: A1111, ComfyUI, kohya) and/or
            ``diffusers`` (LoRA, LoCon and DoRA only; diffusers has no LoHa/LoKr format).
        dirpath: Directory for the files; empty means ``<trainer.default_root_dir>/lora``.
    """

    def __init__(
        self,
        name: str = "lora",
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        save_dtype: Literal["float32", "float16", "bfloat16", "float", "fp32", "fp16", "bf16"] = "float32",
        formats: list[Literal["kohya", "diffusers"]] = ["kohya", "diffusers"],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
        dirpath: str | None = None,
    ):
        self.name = name
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.save_dtype = save_dtype
        self.formats = list(formats)
        self.dirpath = dirpath
        self.written: list[Path] = []
        self._last_step_export = -1
        self._warned_no_diffusers = False

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "lora"

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        # A run killed mid-export (kill -9, preemption) leaves the hidden temporaries of the atomic
        # writes in networks/files.py (`.<name>.safetensors.*`); the finished files are whole.
        # Remove those leftovers when the run (or its resume) starts, on the one rank that writes.
        if not trainer.is_global_zero:
            return
        directory = self._dir(trainer)
        for leftover in list(directory.rglob(".*.safetensors.*")):  # also diffusers/, ema/, embeddings/
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs per micro-batch; export once per optimizer step.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step_export:
            self._last_step_export = step
            self.export(
                trainer,
                pl_module,
                f"{self.name}-step-{step:06d}",
                epochs_done=trainer.current_epoch,
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self.export(trainer, pl_module, f"{self.name}-epoch-{epoch:03d}", epochs_done=epoch)

    def on_train_end(self, trainer, pl_module) -> None:
        # By now Lightning has advanced current_epoch past the last finished epoch.
        self.export(trainer, pl_module, self.name, epochs_done=trainer.current_epoch)

    def training_info(self, trainer: pl.Trainer, pl_module, epochs_done: int) -> TrainingInfo:
        hp, net, cond = pl_module.hparams, pl_module.network, pl_module.conditioning_config
        data = trainer.datamodule
        resolution = getattr(data, "resolution", None)
        tag_frequency = data.tag_frequency() if hasattr(data, "tag_frequency") else None
        flow = pl_module.spec.objective == "flow"
        return TrainingInfo(
            family=pl_module.family,
            prediction_type=pl_module.base.prediction_type,
            rank=net.rank,
            alpha=float(net.rank if net.alpha is None else net.alpha),
            output_name=self.name,
            base_model=str(hp.model),
            resolution=(resolution, resolution) if isinstance(resolution, int) else (512, 512),
            steps=trainer.global_step,
            epoch=epochs_done,
            num_train_images=getattr(data, "num_images", None),
            learning_rate=pl_module.optimizer_config.learning_rate,
            text_encoder_lr=pl_module.learning_rates().get("text_encoder"),
            seed=pl_module.noise_seed,
            mixed_precision=str(trainer.precision),
            clip_skip=cond.clip_skip,
            max_token_length=cond.max_token_length,
            trains_text_encoder=bool(pl_module.trained_text_encoders()),
            tag_frequency=tag_frequency,
            started_at=pl_module.started_at,
            network_module=KOHYA_NETWORK_MODULE[net.type],
            network_args=pl_module.network_spec().kohya_network_args(),
            max_sequence_length=pl_module.spec.sequence_length(pl_module.base, cond) if flow else None,
            guidance=cond.guidance if flow and pl_module.spec.guidance_distilled(pl_module.base) else None,
            timestep_sampling=pl_module.noise.timestep_sampling if flow else None,
            flow_shift=str(pl_module.objective.shift_mode) if flow else None,
        )

    def export(
        self,
        trainer: pl.Trainer,
        pl_module,
        stem: str,
        epochs_done: int,
    ) -> list[Path]:
        """Write ``stem`` in every configured format (global rank 0 only, no collectives), and the
        same files of every weight variant (the EMA, :mod:`lorafit.callbacks.ema`) in its sub-folder."""
        # Keep the last good files: a NaN LoRA would overwrite them. This waits for the NaN/Inf checks
        # of the steps so far (nonfinite.py) and stops the run on one. Every rank checks, so all stop
        # together (the weights are the same on all ranks) instead of leaving some in a collective.
        pl_module.ensure_finite()
        variants = list(_variants(trainer))  # every rank: a variant may have an update to make
        if not trainer.is_global_zero:
            return []
        directory = self._dir(trainer)
        paths = self._write(trainer, pl_module, directory, stem, epochs_done, {})
        for callback, (subdir, metadata) in variants:
            with callback.applied():
                paths += self._write(trainer, pl_module, directory / subdir, stem, epochs_done, metadata)
        self.written.extend(paths)
        return paths

    def _write(
        self, trainer: pl.Trainer, pl_module, directory: Path, stem: str, epochs_done: int, extra: dict[str, str]
    ) -> list[Path]:
        weights = pl_module.lora_weights()
        dtype = SAVE_DTYPES[self.save_dtype]
        paths, bundle = [], {}
        tokens = getattr(pl_module, "trained_tokens", None)
        if tokens is not None:  # textual inversion: standalone files, and the bundle inside the kohya file
            vectors = tokens.export()
            # The final file is named after the token: A1111 and ComfyUI name an embedding by its file.
            emb_stem = tokens.token + stem[len(self.name) :] if stem.startswith(self.name) else stem
            paths += save_embedding_files(directory / "embeddings", emb_stem, tokens.token, vectors, dtype, extra)
            bundle = bundle_tensors(tokens.token, vectors)
        if "kohya" in self.formats:
            metadata = {
                **kohya_metadata(self.training_info(trainer, pl_module, epochs_done)),
                **recipe_metadata(trainer, pl_module),
                **extra,
            }
            if not weights:  # textual inversion alone: the file holds no network, so no network settings
                metadata = {k: v for k, v in metadata.items() if not k.startswith("ss_network_")}
            paths.append(
                save_kohya(
                    directory / f"{stem}.safetensors",
                    pl_module.family,
                    weights,
                    pl_module.denoiser.config,
                    metadata,
                    dtype,
                    denoiser=pl_module.denoiser,
                    extra=bundle,
                )
            )
        if "diffusers" in self.formats and weights:
            kinds = network_kinds(weights)
            if diffusers_can_hold(weights):
                paths.append(
                    save_diffusers(directory / "diffusers" / f"{stem}.safetensors", pl_module.family, weights, dtype)
                )
            elif not self._warned_no_diffusers:
                # diffusers has no LoHa/LoKr format, nor DoRA per input channel; the kohya/LyCORIS file
                # loads with lorafit.load_lora.
                what = sorted(kinds - DIFFUSERS_KINDS) or ["DoRA per input channel"]
                log.warning(
                    "no diffusers-format file for %s networks (diffusers cannot load them); "
                    "the kohya/LyCORIS file loads in A1111, ComfyUI and lorafit.load_lora",
                    what,
                )
                self._warned_no_diffusers = True
        for path in paths:
            log.info("saved %s %s", "embedding" if "embeddings" in path.relative_to(directory).parts else "LoRA", path)
        return paths


def _variants(trainer: pl.Trainer):
    """``(callback, (sub-folder, metadata))`` of each callback that offers other weights to export
    (``export_variant`` + ``applied()``, e.g. the EMA), in callback order."""
    for callback in trainer.callbacks:
        offer = getattr(callback, "export_variant", None)
        variant = offer(trainer) if offer is not None else None
        if variant is not None:
            yield callback, variant


def recipe_metadata(trainer: pl.Trainer, pl_module) -> dict[str, str]:
    """kohya's ``ss_*`` keys for the training recipe (optimizer, schedule, noise, loss), as strings."""
    from lorafit.training.optim import describe, optimizer_kwargs

    opt, noise, loss = pl_module.optimizer_config, pl_module.noise, pl_module.loss_config
    rates = pl_module.learning_rates()
    ddpm = pl_module.spec.objective == "ddpm"
    values = {
        "ss_unet_lr": rates[pl_module.spec.denoiser_component],
        "ss_optimizer": describe(opt.name, optimizer_kwargs(opt.name, opt.weight_decay, opt.betas, opt.args)),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": opt.lr_warmup_steps,
        "ss_max_grad_norm": trainer.gradient_clip_val or 0.0,
        "ss_gradient_accumulation_steps": trainer.accumulate_grad_batches,
        "ss_gradient_checkpointing": pl_module.memory.gradient_checkpointing,
        "ss_loss_type": loss.type,
        "ss_huber_schedule": loss.huber_schedule,
        "ss_huber_c": loss.huber_c,
        "ss_huber_scale": loss.huber_scale,
        "ss_prior_loss_weight": loss.prior_weight,
    }
    if ddpm:  # the DDPM recipe knobs; flow families record theirs in kohya_metadata
        values.update(
            {
                "ss_noise_offset": noise.offset or None,
                "ss_noise_offset_random_strength": noise.offset_random_strength,
                "ss_multires_noise_iterations": noise.multires_iterations or None,
                "ss_multires_noise_discount": noise.multires_discount,
                "ss_ip_noise_gamma": noise.ip_gamma or None,
                "ss_ip_noise_gamma_random_strength": noise.ip_gamma_random_strength,
                "ss_min_snr_gamma": loss.min_snr_gamma,
                "ss_debiased_estimation": loss.debiased_estimation,
                "ss_zero_terminal_snr": noise.zero_terminal_snr,
            }
        )
    else:
        values["ss_weighting_scheme"] = loss.weighting
    return {key: str(value) for key, value in values.items() if value is not None}
