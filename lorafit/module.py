"""LoraDiffusionModule: a frozen Stable Diffusion model with trainable LoRA adapters.

Orchestration only: loading lives in ``models/``, adapters in ``networks/``, and the training
step reads like the paper (encode, noise, predict, regress onto the family's target).
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.models.base import BaseModel, Family, PredictionType, load_base_model, resolve_model_source
from lorafit.models.conditioning import TextConditioning, encode_tokens, sdxl_time_ids, tokenize
from lorafit.networks.adapters import ADAPTER_NAME, DEFAULT_TEXT_ENCODER_TARGETS, attach_network
from lorafit.networks.lora_weights import LoraWeights
from lorafit.networks.network_types import NetworkSpec, NetworkType
from lorafit.networks.peft_layers import from_peft_model
from lorafit.networks.presets import TargetPreset, preset_modules

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def step_seed(base_seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """A seed for one micro-batch that depends only on where it is in training.

    Noise and timesteps drawn from it are the same whether a run was interrupted and resumed or
    not, and differ between DDP ranks.
    """
    digest = hashlib.blake2b(f"{base_seed}:{epoch}:{batch_idx}:{rank}".encode(), digest_size=8).digest()
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
        unet_target_modules: Optional[Union[list[str], str]] = None,
        train_text_encoder: bool = False,
        text_encoder_target_modules: Union[list[str], str] = DEFAULT_TEXT_ENCODER_TARGETS,
        network_type: NetworkType = "lora",
        target_preset: TargetPreset = "attn",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        conv_rank: Optional[int] = None,
        conv_alpha: Optional[float] = None,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        lokr_factor: int = -1,
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
        spec = self.network_spec()
        if hp.unet_target_modules is not None:
            unet_targets, key = hp.unet_target_modules, "model.unet_target_modules"
        else:
            unet_targets = preset_modules(self.unet, hp.target_preset, with_conv_blocks=hp.network_type == "locon")
            key = "model.target_preset"
        attach_network(self.unet, spec, unet_targets, hp.include, hp.exclude, key)
        if hp.train_text_encoder:
            for encoder in self.text_encoders:
                attach_network(encoder, spec, hp.text_encoder_target_modules, hp.include, hp.exclude,
                               "model.text_encoder_target_modules")

    def network_spec(self) -> NetworkSpec:
        hp = self.hparams
        return NetworkSpec(hp.network_type, hp.rank, hp.alpha, hp.conv_rank, hp.conv_alpha,
                           dict(hp.rank_pattern or {}), dict(hp.alpha_pattern or {}), hp.lokr_factor)

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
        return from_peft_model(self.lora_components(), ADAPTER_NAME)

    # ---- training -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.noise_seed is None:  # restored from the checkpoint on resume
            self.noise_seed = torch.initial_seed()

    def _generator(self, batch_idx: int) -> torch.Generator:
        seed = step_seed(self.noise_seed, self.current_epoch, batch_idx, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def text_conditioning(self, batch: dict) -> TextConditioning:
        """Text embeddings for ``batch``: cached ones when the batch carries them, else encoded now."""
        if "prompt_embeds" in batch:  # from `lorafit cache` (frozen text encoders only)
            pooled = batch.get("pooled_prompt_embeds")
            return TextConditioning(batch["prompt_embeds"].to(self.device),
                                    None if pooled is None else pooled.to(self.device))
        ids = tokenize(self.base.tokenizers, batch["captions"], self.device)
        with torch.set_grad_enabled(self.hparams.train_text_encoder and self.training):
            return encode_tokens(self.family, list(self.text_encoders), ids, self.hparams.clip_skip)

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents of ``batch``, sampled from the posterior with ``generator``.

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

    def denoising_loss(self, batch: dict, generator: torch.Generator,
                       timesteps: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MSE between the UNet's prediction and the family's target on noised latents of ``batch``.

        ``timesteps``/``noise`` may be fixed by the caller (evaluation at fixed points); otherwise
        they are drawn from ``generator``.

        The batch contract (every lorafit DataModule): ``captions`` (list of str), ``original_size``
        and ``crop_top_left`` (long [B, 2]), ``is_reg`` (bool [B], regularization samples), and
        either ``pixel_values`` (float [B, 3, H, W] in [-1, 1]) or ``latent_moments`` (cached); it
        may carry cached ``prompt_embeds``/``pooled_prompt_embeds``.
        """
        latents = self.latents(batch, generator)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      generator=generator, device=self.device)
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
        loss = self.denoising_loss(batch, self._generator(batch_idx))
        self.log("loss/current", loss, prog_bar=True, batch_size=len(batch["captions"]))
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
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lorafit"] = {"noise_seed": self.noise_seed, "started_at": self.started_at, "family": self.family}

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
