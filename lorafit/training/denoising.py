"""The denoising step of LoRA training: encode, noise, predict, weighted regression onto the target.

A mixin of :class:`lorafit.training.module.LoraDiffusionModule`, which holds the parts it reads (``vae``,
``unet``, ``text_encoders``, ``base``, ``noise_scheduler``, ``hparams``); kept apart so the step
reads like the paper while module.py holds the Lightning wiring (configuration, optimizers,
checkpoints).

Every random draw takes an explicit generator seeded from the step's position (``step_seed``), so
resumed, DDP and global-batch runs draw exactly what an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from lorafit.errors import LorafitError
from lorafit.families.clip_text import (
    TextConditioning,
    caption_chunks,
    encode_tokens,
    hidden_length,
    sdxl_time_ids,
    tokenize,
)
from lorafit.training import losses

log = logging.getLogger("lorafit.train")


def step_seed(base_seed: int, epoch: int, batch_idx: int, slot: int) -> int:
    """A seed that depends only on where it is in training: epoch, batch index and ``slot`` (the rank).

    Noise and timesteps drawn from it are the same whether a run was interrupted and resumed or
    not, and differ between DDP ranks.
    """
    digest = hashlib.blake2b(f"{base_seed}:{epoch}:{batch_idx}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def hash_key(key: str) -> int:
    """A stable 63-bit seed from a sample key (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _global_shape(batch: dict, shape: torch.Size) -> tuple[int, ...]:
    """``shape`` with the batch dimension of the whole global batch (data.global_batch)."""
    return (int(batch["global_size"]), *shape[1:])


def _tokens(max_token_length: int | None) -> str:
    return str(max_token_length) if max_token_length else "empty (75 tokens)"


def _recache(max_token_length: int | None) -> str:
    if max_token_length:
        return f"run `lorafit cache ... --text_embeddings true --max_token_length {max_token_length}` again"
    return "run `lorafit cache ... --text_embeddings true` again without --max_token_length"


class DenoisingStep:
    """The training/validation loss of a frozen diffusion model with adapters (see module docstring)."""

    def _generator(self, batch: dict, batch_idx: int) -> torch.Generator:
        # A global batch (data.global_batch) is one draw shared by all ranks, each keeping its rows.
        slot = 0 if "global_rows" in batch else self.global_rank
        seed = step_seed(self.noise_seed, self.current_epoch, batch_idx, slot)
        return torch.Generator(device=self.device).manual_seed(seed)

    def text_conditioning(self, batch: dict) -> TextConditioning:
        """Text embeddings for ``batch``: cached ones when the batch carries them, else encoded now."""
        if "prompt_embeds" in batch:  # from `lorafit cache` (frozen text encoders only)
            if self.hparams.train_text_encoder:
                raise LorafitError(
                    "data.shards hold cached text embeddings, but model.train_text_encoder is true; "
                    "cache latents only (lorafit cache without --text_embeddings)"
                )
            # Also checked from the shards' metadata at fit start (check_cache); this catches
            # cached validation shards and `lorafit validate`, which that check does not see. (The
            # benchmark's random-weight models have no tokenizer: their embeddings are synthetic.)
            length = self.base.tokenizers and hidden_length(self.base.tokenizers[0], self.hparams.max_token_length)
            if length and batch["prompt_embeds"].shape[1] != length:
                raise LorafitError(
                    f"the data's cached text embeddings have {batch['prompt_embeds'].shape[1]} token positions, but "
                    f"model.max_token_length {_tokens(self.hparams.max_token_length)} needs {length}; "
                    f"{_recache(self.hparams.max_token_length)}"
                )
            pooled = batch.get("pooled_prompt_embeds")
            return TextConditioning(
                batch["prompt_embeds"].to(self.device), None if pooled is None else pooled.to(self.device)
            )
        ids = tokenize(self.base.tokenizers, batch["captions"], self.device, self.hparams.max_token_length)
        with torch.set_grad_enabled(bool(self.trained_text_encoders()) and self.training):
            return encode_tokens(self.family, list(self.text_encoders), ids, self.hparams.clip_skip)

    def check_cache(self, cached: dict | None) -> None:
        """Refuse cached shards that differ from what this model would encode from the images and captions.

        ``cached`` is the training shards' ``cached`` section (dataset.json of `lorafit cache`), None
        for uncached shards; called at fit start so a mismatch fails before the first step rather
        than training on latents of another VAE or text embeddings of the wrong length or layer.
        """
        if not cached:
            return
        hp = self.hparams
        if cached.get("family") != self.family:
            raise LorafitError(
                f"data.shards hold latents cached with a {cached.get('family')} model "
                f"({cached.get('model')}); this model is {self.family}: run `lorafit cache` with it"
            )
        if cached.get("model") != hp.model:
            log.warning(
                "cached latents were made with %s; training %s (same family %s): fine if they share a VAE",
                cached.get("model"),
                hp.model,
                self.family,
            )
        if not cached.get("text_embeddings"):
            return
        tokenizer = self.base.tokenizers[0]
        made = cached.get("max_token_length")  # absent: caches made before the option, 75 tokens
        # Compare chunk counts: 100 and 150 both read two 75-token chunks and encode identically.
        if caption_chunks(tokenizer, made) != caption_chunks(tokenizer, hp.max_token_length):
            raise LorafitError(
                f"data.shards hold text embeddings cached with max_token_length {made or '75 (none given)'}, but "
                f"model.max_token_length is {_tokens(hp.max_token_length)}; {_recache(hp.max_token_length)}, "
                + (f"or set model.max_token_length: {made}" if made else "or leave model.max_token_length empty")
            )
        if self.family != "sdxl" and cached.get("clip_skip", 1) != hp.clip_skip:
            raise LorafitError(
                f"data.shards hold text embeddings cached with clip_skip {cached.get('clip_skip', 1)}, but "
                f"model.clip_skip is {hp.clip_skip}; run `lorafit cache ... --text_embeddings true --clip_skip "
                f"{hp.clip_skip}` again, or set model.clip_skip: {cached.get('clip_skip', 1)}"
            )

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled VAE latents of ``batch``, sampled from the posterior with ``generator``.

        A cached batch carries the posterior's moments (``latent_moments``: mean and log-variance
        stacked on channels) instead of pixels; sampling from them with the same generator gives
        exactly the latents the uncached path would, so cached and uncached training agree. The VAE
        runs in ``vae_dtype`` with autocast off: fp16 autocast would overflow it just like fp16 weights.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if "latent_moments" in batch:
                posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(self.device, torch.float32))
            else:
                posterior = self.vae.encode(batch["pixel_values"].to(self.device, self.vae.dtype)).latent_dist
            if "global_rows" in batch:  # this rank's rows of the global batch's draw
                eps = torch.randn(
                    _global_shape(batch, posterior.mean.shape),
                    generator=generator,
                    device=posterior.mean.device,
                    dtype=posterior.mean.dtype,
                )
                latents = posterior.mean + posterior.std * eps[batch["global_rows"].to(eps.device)]
            else:
                latents = posterior.sample(generator=generator)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            return ((latents - shift) * self.vae.config.scaling_factor).float()

    def noised(
        self,
        latents: torch.Tensor,
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        global_rows: torch.Tensor | None = None,
        global_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, noisy latents, timesteps): the forward process with the recipe's noise options.

        Drawn noise gets the offset and pyramid options and the noisy input gets input perturbation;
        a caller-given ``noise`` is used as it is (evaluation at fixed points). With ``global_rows``
        every draw is made for the whole global batch of ``global_size`` and these rows are kept,
        so the ranks of a global batch together draw exactly what one process would.
        """
        hp = self.hparams
        given = noise is not None
        shape = latents.shape if global_rows is None else (global_size, *latents.shape[1:])
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=self.device)
        if timesteps is None:
            timesteps = losses.sample_timesteps(shape[0], generator, hp.min_timestep, self.max_timestep, self.device)
        if given:
            return noise, self.noise_scheduler.add_noise(latents, noise, timesteps), timesteps
        noise = losses.offset_noise(noise, hp.noise_offset, generator, hp.noise_offset_random_strength)
        noise = losses.pyramid_noise(noise, generator, hp.multires_noise_iterations, hp.multires_noise_discount)
        model_noise = losses.perturbed_noise(noise, hp.ip_noise_gamma, generator, hp.ip_noise_gamma_random_strength)
        if global_rows is not None:
            rows = global_rows.to(noise.device)
            noise, model_noise, timesteps = noise[rows], model_noise[rows], timesteps[rows.to(timesteps.device)]
        return noise, self.noise_scheduler.add_noise(latents, model_noise, timesteps), timesteps

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
        if self.base.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning, batch: dict
    ) -> torch.Tensor:
        """The UNet's output on ``noisy`` latents, with SDXL's size/crop micro-conditioning."""
        added = None
        if self.family == "sdxl":
            # Pixel size of the training image = latent size times the VAE's downscale factor.
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            target_size = (noisy.shape[-2] * scale, noisy.shape[-1] * scale)
            time_ids = sdxl_time_ids(
                batch["original_size"].to(self.device), batch["crop_top_left"].to(self.device), target_size
            )
            added = {"text_embeds": text.pooled, "time_ids": time_ids}
        unet_dtype = self.unet.dtype
        return self.unet(
            noisy.to(unet_dtype), timesteps, text.hidden_states.to(unet_dtype), added_cond_kwargs=added
        ).sample

    def weighted_loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        is_reg: torch.Tensor | None = None,
        share: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss, weighted by prior-loss, min-SNR and debiased weights, averaged over the batch.

        ``share`` weighs a rank's rows of a global batch (see lorafit.data.stream.global_share).
        """
        hp = self.hparams
        alphas_cumprod = self.noise_scheduler.alphas_cumprod
        huber_c = None
        if hp.loss_type in ("huber", "smooth_l1"):
            huber_c = losses.huber_threshold(
                timesteps,
                hp.huber_schedule,
                hp.huber_c,
                hp.huber_scale,
                alphas_cumprod,
                self.noise_scheduler.config.num_train_timesteps,
            )
        per_sample = losses.per_sample_loss(prediction, target, hp.loss_type, huber_c)
        snr = losses.signal_to_noise(alphas_cumprod, timesteps)
        prediction_type = self.base.prediction_type
        return losses.weighted_mean(
            per_sample,
            losses.prior_weights(is_reg, per_sample.shape[0], hp.prior_loss_weight, per_sample.device),
            losses.min_snr_weight(snr, hp.min_snr_gamma, prediction_type) if hp.min_snr_gamma else None,
            losses.debiased_weight(snr, prediction_type) if hp.debiased_estimation_loss else None,
            share,
        )

    def denoising_loss(
        self,
        batch: dict,
        generator: torch.Generator,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss on ``batch``: encode, noise, predict, weighted loss against the family's target.

        ``timesteps``/``noise`` may be fixed by the caller (evaluation at fixed points); otherwise
        they are drawn from ``generator``.

        The batch contract (every lorafit DataModule): ``captions`` (list of str), ``original_size``
        and ``crop_top_left`` (long [B, 2]), ``is_reg`` (bool [B], regularization samples; absent =
        none), and either ``pixel_values`` (float [B, 3, H, W] in [-1, 1]) or ``latent_moments``
        (cached); it may carry cached ``prompt_embeds``/``pooled_prompt_embeds``.
        """
        latents = self.latents(batch, generator)
        noise, noisy, timesteps = self.noised(
            latents, generator, timesteps, noise, batch.get("global_rows"), batch.get("global_size")
        )
        prediction = self.predict(noisy, timesteps, self.text_conditioning(batch), batch)
        return self.weighted_loss(
            prediction,
            self.target(latents, noise, timesteps),
            timesteps,
            batch.get("is_reg"),
            batch.get("global_weights"),
        )

    def _latent_shape(self, batch: dict) -> tuple[int, ...]:
        if "latent_moments" in batch:  # mean and log-variance stacked on channels
            b, c2, h, w = batch["latent_moments"].shape
            return b, c2 // 2, h, w
        b, _, h, w = batch["pixel_values"].shape
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return b, self.vae.config.latent_channels, h // scale, w // scale

    def fixed_noise(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Noise, timesteps and a posterior generator that depend only on which samples are in ``batch``.

        Each sample's noise and timestep come from a seed derived from its key, so a held-out image
        is scored at the same point every epoch, and at the same noise and timestep whatever the
        batch size, order or number of ranks: validation losses of different epochs (and of runs
        with another batch size) compare. Only the VAE posterior sample is drawn per batch (its
        spread is tiny next to the noise). Batches without keys fall back to their position.
        """
        shape = self._latent_shape(batch)
        keys = batch.get("keys") or [f"{batch_idx}:{i}" for i in range(shape[0])]
        noise, timesteps = [], []
        for key in keys:
            generator = torch.Generator().manual_seed(hash_key(str(key)))
            noise.append(torch.randn(shape[1:], generator=generator))
            timesteps.append(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (), generator=generator))
        posterior = torch.Generator(device=self.device).manual_seed(hash_key("|".join(map(str, keys))))
        return torch.stack(noise).to(self.device), torch.stack(timesteps).to(self.device), posterior
