"""LoraDiffusionModule: a frozen Stable Diffusion model with trainable LoRA adapters.

Orchestration only: loading lives in ``models/``, adapters in ``networks/``, and the training
step reads like the paper (encode, noise, predict, regress onto the family's target).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.models.base import BaseModel, Family, PredictionType, load_base_model, resolve_model_source
from lorafit.models.conditioning import TextConditioning, encode_tokens, sdxl_time_ids, text_layers_used, tokenize
from lorafit.networks.adapters import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS, add_lora, lora_config
from lorafit.networks.lora_weights import LoraWeights, from_peft_model
from lorafit.rng_state import gather_rng_states, restore_rng_states

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


Generators = Union[torch.Generator, Sequence[torch.Generator]]
_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def step_seed(base_seed: int, epoch: int, batch_idx: int, slot: int) -> int:
    """A seed that depends only on where it is in training: epoch, batch index and ``slot``.

    Training uses one per sample, ``slot`` being the sample's place in the step's global batch
    (see :meth:`LoraDiffusionModule.sample_generators`). Noise and timesteps drawn from it are the
    same whether a run was interrupted and resumed or not.
    """
    digest = hashlib.blake2b(f"{base_seed}:{epoch}:{batch_idx}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LoraDiffusionModule(pl.LightningModule):
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
        unet_target_modules: UNet modules to adapt: a list of name suffixes or one full-match regex.
        train_text_encoder: Also train LoRA on the text encoder(s).
        text_encoder_target_modules: Text-encoder modules to adapt (suffixes or a regex).
        learning_rate: AdamW learning rate of the UNet LoRA (kohya's ``unet_lr``).
        text_encoder_lr: Learning rate of the text-encoder LoRA; empty means ``learning_rate``.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        adam_epsilon: AdamW epsilon.
        clip_skip: SD1/SD2: use the hidden state this many layers from the end (2 = A1111 "clip
            skip 2"). SDXL always uses the penultimate layer.
    """

    def __init__(
        self,
        model: str,
        family: Optional[Family] = None,
        prediction_type: Optional[PredictionType] = None,
        single_file_config: Optional[str] = None,
        revision: Optional[str] = None,
        variant: Optional[str] = None,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        rank: int = 16,
        alpha: Optional[float] = None,
        unet_target_modules: Union[list[str], str] = DEFAULT_UNET_TARGETS,
        train_text_encoder: bool = False,
        text_encoder_target_modules: Union[list[str], str] = DEFAULT_TEXT_ENCODER_TARGETS,
        learning_rate: float = 1e-4,
        text_encoder_lr: Optional[float] = None,
        weight_decay: float = 1e-2,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_epsilon: float = 1e-8,
        clip_skip: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        resolve_model_source(model)  # a bad path fails here, before any weights are read
        self.base: Optional[BaseModel] = None
        self.unet: Optional[torch.nn.Module] = None
        self.vae: Optional[torch.nn.Module] = None
        self.text_encoders = torch.nn.ModuleList()
        self.noise_scheduler = None
        self.noise_seed: Optional[int] = None
        self.started_at = time.time()
        # Checkpoints hold only the LoRA weights (see on_save_checkpoint), so loading them must
        # not demand the frozen base weights.
        self.strict_loading = False

    # ---- model construction -------------------------------------------------------------

    def configure_model(self) -> None:
        if self.unet is not None:  # Lightning may call this more than once
            return
        from diffusers import DDPMScheduler

        hp = self.hparams
        base = load_base_model(hp.model, hp.family, hp.prediction_type, hp.single_file_config, hp.weight_dtype,
                               hp.revision, hp.variant)
        self.base = base
        self.unet, self.vae = base.unet, base.vae
        self.text_encoders = torch.nn.ModuleList(base.text_encoders)
        # Training noise follows the model's own beta schedule; DDPM is the forward process.
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config, prediction_type=base.prediction_type)
        add_lora(self.unet, lora_config(hp.rank, hp.alpha, hp.unet_target_modules, "model.unet_target_modules"),
                 "model.unet_target_modules")
        if hp.train_text_encoder:
            config = lora_config(hp.rank, hp.alpha, hp.text_encoder_target_modules, "model.text_encoder_target_modules")
            for encoder in self.text_encoders:
                add_lora(encoder, config, "model.text_encoder_target_modules")
            self._freeze_unread_text_layers()

    def _freeze_unread_text_layers(self) -> None:
        """Freeze LoRA on text-encoder layers after the hidden state the UNet is conditioned on.

        They cannot affect the loss (SDXL's first encoder skips its last layer, as does clip_skip),
        so they never get a gradient; left trainable, DDP stops with "parameters that were not used
        in producing the loss". They stay in the exported files at their initial, no-op values.
        """
        for index, encoder in enumerate(self.text_encoders):
            used = text_layers_used(self.family, index, encoder.config.num_hidden_layers, self.hparams.clip_skip)
            for name, parameter in encoder.named_parameters():
                match = _TEXT_LAYER.search(name)
                if "lora_" in name and match and int(match.group(1)) >= used:
                    parameter.requires_grad_(False)

    @property
    def family(self) -> str:
        return self.base.family

    def lora_components(self) -> dict[str, torch.nn.Module]:
        """The adapted modules by diffusers component name (``unet``, ``text_encoder``, ...)."""
        components = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            components.update(zip(TEXT_ENCODER_NAMES, self.text_encoders))
        return components

    def lora_weights(self) -> LoraWeights:
        return from_peft_model(self.lora_components())

    # ---- training -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.noise_seed is None:  # restored from the checkpoint on resume
            self.noise_seed = torch.initial_seed()

    def sample_generators(self, batch_idx: int, batch_size: int) -> list[torch.Generator]:
        """One generator per sample of this micro-batch, seeded by the sample's place in the global batch.

        Sample ``j`` of rank ``r`` is sample ``j * world_size + r`` of the step's global batch: the
        order in which a DistributedSampler deals the epoch out to the ranks. Seeding per sample by
        that place, not per rank, gives every image the same latent sample, noise and timestep
        however many processes share the batch, so N processes with batch B train what one process
        with batch N*B does (up to float summation order). Seeds depend only on the position in
        training, never on RNG state, so a resumed run draws what an uninterrupted one would.
        """
        trainer = self._trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return [
            torch.Generator(device=self.device).manual_seed(
                step_seed(self.noise_seed, self.current_epoch, batch_idx, j * world_size + rank))
            for j in range(batch_size)
        ]

    def text_conditioning(self, batch: dict) -> TextConditioning:
        """Text embeddings for ``batch``: cached ones when the batch carries them, else encoded now."""
        if "prompt_embeds" in batch:  # from `lorafit cache` (frozen text encoders only)
            pooled = batch.get("pooled_prompt_embeds")
            return TextConditioning(batch["prompt_embeds"].to(self.device),
                                    None if pooled is None else pooled.to(self.device))
        ids = tokenize(self.base.tokenizers, batch["captions"], self.device)
        with torch.set_grad_enabled(self.hparams.train_text_encoder and self.training):
            return encode_tokens(self.family, list(self.text_encoders), ids, self.hparams.clip_skip)

    def latents(self, batch: dict, generator: Generators) -> torch.Tensor:
        """Scaled VAE latents of ``batch``, sampled from the posterior with ``generator``.

        ``generator`` is one generator for the batch or a list of one per sample.

        A cached batch carries the posterior's moments (``latent_moments``: mean and log-variance
        stacked on channels) instead of pixels; sampling from them with the same generator gives
        exactly the latents the uncached path would, so cached and uncached training agree.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with torch.no_grad():
            if "latent_moments" in batch:
                posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.device, torch.float32))
            else:
                posterior = self.vae.encode(batch["pixel_values"].to(self.device, self.vae.dtype)).latent_dist
            latents = posterior.sample(generator=generator)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return ((latents - shift) * self.vae.config.scaling_factor).float()

    def denoising_loss(self, batch: dict, generator: Generators,
                       timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MSE between the UNet's prediction and the family's target on noised latents of ``batch``.

        ``timesteps``/``noise`` may be fixed by the caller (evaluation at fixed points); otherwise
        they are drawn from ``generator``: one generator for the batch, or one per sample (each
        sample's latent sample, noise and timestep then come from its own generator).

        The batch contract (every lorafit DataModule): ``captions`` (list of str), ``original_size``
        and ``crop_top_left`` (long [B, 2]), ``is_reg`` (bool [B], regularization samples), and
        either ``pixel_values`` (float [B, 3, H, W] in [-1, 1]) or ``latent_moments`` (cached); it
        may carry cached ``prompt_embeds``/``pooled_prompt_embeds``.
        """
        from diffusers.utils.torch_utils import randn_tensor

        latents = self.latents(batch, generator)
        if noise is None:
            noise = randn_tensor(latents.shape, generator=generator, device=self.device)
        if timesteps is None:
            steps = self.noise_scheduler.config.num_train_timesteps
            if isinstance(generator, torch.Generator):
                timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=self.device)
            else:
                timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g, device=g.device) for g in generator])
                timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.base.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        text = self.text_conditioning(batch)
        added = None
        if self.family == "sdxl":
            # Pixel size of the training image = latent size times the VAE's downscale factor.
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            target_size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
            time_ids = sdxl_time_ids(batch["original_size"].to(self.device), batch["crop_top_left"].to(self.device),
                                     target_size)
            added = {"text_embeds": text.pooled, "time_ids": time_ids}
        unet_dtype = self.unet.dtype
        prediction = self.unet(noisy.to(unet_dtype), timesteps, text.hidden_states.to(unet_dtype),
                               added_cond_kwargs=added).sample
        return F.mse_loss(prediction.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch_size = len(batch["captions"])
        loss = self.denoising_loss(batch, self.sample_generators(batch_idx, batch_size))
        # sync_dist: the logged value is the mean over all ranks' samples, i.e. the global batch's loss.
        self.log("loss/current", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed noise per batch position, so validation losses of different epochs compare.
        generator = torch.Generator(device=self.device).manual_seed(step_seed(0, 0, batch_idx, 0))
        loss = self.denoising_loss(batch, generator)
        self.log("loss/validation", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["captions"]))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": hp.learning_rate}]
        if hp.train_text_encoder:
            params = [p for encoder in self.text_encoders for p in encoder.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": hp.text_encoder_lr or hp.learning_rate})
        return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.adam_betas), eps=hp.adam_epsilon,
                                 weight_decay=hp.weight_decay)

    # ---- checkpoints: LoRA weights only -------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Every LoRA weight, trained or frozen (see _freeze_unread_text_layers): a resumed run must
        # export exactly what the uninterrupted one would, whatever the seed it starts with.
        keep = {name for name, p in self.named_parameters() if p.requires_grad or "lora_" in name}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lorafit"] = {"noise_seed": self.noise_seed, "started_at": self.started_at, "family": self.family,
                                 "rng_states": gather_rng_states()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning would raise a page of "size mismatch" lines; say in one what went wrong.
        params = dict(self.named_parameters())
        for key, tensor in checkpoint.get("state_dict", {}).items():
            if key not in params or params[key].shape != tensor.shape:
                found = "is missing here" if key not in params else f"is {tuple(params[key].shape)} here"
                raise LorafitError(
                    f"checkpoint LoRA weight {key} {tuple(tensor.shape)} {found}; resume with the same base model "
                    "and model.* LoRA settings (rank, targets, train_text_encoder) the checkpoint was trained with"
                )
        info = checkpoint.get("lorafit", {})
        self.noise_seed = info.get("noise_seed", self.noise_seed)
        self.started_at = info.get("started_at", self.started_at)
        if info.get("rng_states"):
            restore_rng_states(info["rng_states"], self.global_rank)
