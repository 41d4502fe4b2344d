"""The denoising step of LoRA training: encode, noise, predict, weighted regression onto the target.

It reads like the paper and knows nothing of Lightning: the family turns captions into
conditioning and calls its denoiser (:class:`~lorafit.families.family.Family`), the objective
noises latents and weighs the loss (:mod:`~lorafit.training.ddpm`, :mod:`~lorafit.training.flow_matching`).
Every random draw takes an explicit generator seeded from the step's position (:func:`step_seed`),
so resumed, DDP and global-batch runs draw exactly what an uninterrupted run would.

The batch contract (every lorafit DataModule): ``captions`` (list of str), ``original_size`` and
``crop_top_left`` (long [B, 2]), ``is_reg`` (bool [B], regularization samples; absent = none),
and either ``pixel_values`` (float [B, 3, H, W] in [-1, 1]) or ``latent_moments`` (cached); it may
carry cached conditioning (the family's ``conditioning_keys``, e.g. ``prompt_embeds``) and
``loss_mask`` (float [B, 1, H, W] in [0, 1], :mod:`~lorafit.training.masked_loss`).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import BaseModel, Family, TextOptions
from lorafit.training.masked_loss import latent_weights

log = logging.getLogger("lorafit.train")


def step_seed(base_seed: int, epoch: int, batch_idx: int, slot: int) -> int:
    """A seed that depends only on where it is in training: epoch, batch index and ``slot`` (the rank)."""
    digest = hashlib.blake2b(f"{base_seed}:{epoch}:{batch_idx}:{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def hash_key(key: str) -> int:
    """A stable 63-bit seed from a sample key (Python's ``hash`` differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


class DenoisingStep:
    """The loss of a frozen diffusion model with adapters on a batch (see module docstring).

    Args:
        base: The loaded model (its modules may carry adapters).
        objective: A :class:`~lorafit.training.ddpm.DDPMObjective` or
            :class:`~lorafit.training.flow_matching.FlowMatchingObjective`.
        options: How captions become conditioning (``model.conditioning``).
        trains_text: Whether any text encoder carries a trained LoRA (captions then run with grad).
        prior: The output-preserving prior (:mod:`~lorafit.training.output_prior`), added to the
            training loss; None = off.
        adapted: The modules carrying adapters (switched off for the prior's base prediction).
        captions: Rewrites captions before they are encoded (textual inversion's multi-vector
            tokens, :mod:`~lorafit.training.token_embeddings`); None = as they are.
        slider: A concept slider (:mod:`~lorafit.training.slider`), whose loss replaces the
            denoising loss in training; None = off.
    """

    def __init__(
        self,
        base: BaseModel,
        family: Family,
        objective,
        options: TextOptions,
        trains_text: bool,
        prior=None,
        adapted: list[torch.nn.Module] | None = None,
        captions=None,
        slider=None,
    ):
        self.base, self.family, self.objective, self.options, self.trains_text = (
            base,
            family,
            objective,
            options,
            trains_text,
        )
        self.prior, self.adapted, self.captions, self.slider = prior, list(adapted or []), captions, slider
        self.last_prior: torch.Tensor | None = None  # the last training step's prior term, for logging

    def conditioning(self, batch: dict, device: torch.device, training: bool) -> dict[str, torch.Tensor]:
        """Conditioning for ``batch``: cached tensors when the batch carries them, else encoded now."""
        if self.family.conditioning_keys[0] in batch:  # from `lorafit cache` (frozen text encoders only)
            if self.trains_text:
                raise LorafitError(
                    "data.shards hold cached text embeddings, but model.network.train_text_encoder is true; "
                    "cache latents only (lorafit cache without --text_embeddings)"
                )
            # Also checked from the shards' metadata at fit start (check_cache); this catches cached
            # validation shards and `lorafit validate`, which that check does not see.
            self.family.check_cached_conditioning(self.base, batch, self.options)
            return {key: batch[key].to(device) for key in self.family.conditioning_keys if key in batch}
        with torch.set_grad_enabled(self.trains_text and training):
            captions = batch["captions"] if self.captions is None else self.captions(batch["captions"])
            return self.family.encode_text(self.base, captions, self.options, device)

    def latents(self, batch: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Normalized VAE latents of ``batch``, sampled from the posterior with ``generator``.

        A cached batch carries the posterior's moments (``latent_moments``: mean and log-variance
        stacked on channels) instead of pixels; sampling from them with the same generator gives
        exactly the latents the uncached path would. The VAE runs in its own dtype with autocast
        off: fp16 autocast would overflow it just like fp16 weights.
        """
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.base.vae
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if "latent_moments" in batch:
                posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(device, torch.float32))
            else:
                posterior = self.family.vae_posterior(vae, batch["pixel_values"].to(device, self.base.vae_dtype()))
            if "global_rows" in batch:  # this rank's rows of the global batch's draw
                shape = (int(batch["global_size"]), *posterior.mean.shape[1:])
                eps = torch.randn(shape, generator=generator, device=posterior.mean.device, dtype=posterior.mean.dtype)
                latents = posterior.mean + posterior.std * eps[batch["global_rows"].to(eps.device)]
            else:
                latents = posterior.sample(generator=generator)
            return self.family.normalize_latents(vae, latents).float()

    def loss(
        self,
        batch: dict,
        generator: torch.Generator,
        device: torch.device,
        training: bool = True,
        fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The training loss on ``batch``: encode, noise, predict, weighted loss against the target.

        ``fixed`` = (noise, timesteps) evaluates at given points (validation); otherwise both are
        drawn from ``generator`` with the recipe's noise options.
        """
        latents = self.latents(batch, generator, device)
        if self.slider is not None and training and fixed is None:  # validation stays the denoising loss
            return self.slider.loss(self, batch, latents, generator, device, self.adapted)
        if fixed is None:
            draw = self.objective.draw(latents, generator, batch.get("global_rows"), batch.get("global_size"))
        else:
            draw = self.objective.at(latents, *fixed)
        conditioning = self.conditioning(batch, device, training)
        prediction = self.family.predict(self.base, draw.noisy, draw.timesteps, conditioning, batch, self.options)
        mask = batch.get("loss_mask")
        cfg = self.objective.loss_config
        weight = latent_weights(
            None if mask is None else mask.to(device), latents.shape[-2:], cfg.mask_floor, cfg.mask_normalize
        )
        loss = self.objective.loss(
            prediction, draw.target, draw.timesteps, batch.get("is_reg"), batch.get("global_weights"), weight
        )
        if self.prior is not None and training and fixed is None:  # validation stays the denoising loss
            term = self.prior.loss(self, batch, draw, device, self.adapted)
            self.last_prior = term.detach()
            loss = loss + term
        return loss

    def latent_shape(self, batch: dict) -> tuple[int, ...]:
        if "latent_moments" in batch:  # mean and log-variance stacked on channels
            b, c2, h, w = batch["latent_moments"].shape
            return b, c2 // 2, h, w
        b, _, h, w = batch["pixel_values"].shape
        vae = self.base.vae
        scale = self.family.vae_scale_factor(vae)
        return b, self.family.latent_channels(vae), h // scale, w // scale

    def fixed_points(self, batch: dict, batch_idx: int, device: torch.device):
        """Noise, timesteps and a posterior generator that depend only on which samples are in ``batch``.

        Each sample's noise and timestep come from a seed derived from its key, so a held-out image
        is scored at the same point every epoch, whatever the batch size, order or number of ranks:
        validation losses of different epochs (and of runs with another batch size) compare. Only
        the VAE posterior sample is drawn per batch (its spread is tiny next to the noise).
        """
        shape = self.latent_shape(batch)
        keys = batch.get("keys") or [f"{batch_idx}:{i}" for i in range(shape[0])]
        noise, timesteps = [], []
        for key in keys:
            generator = torch.Generator().manual_seed(hash_key(str(key)))
            noise.append(torch.randn(shape[1:], generator=generator))
            timesteps.append(self.objective.fixed_timestep(generator, shape[-2:]))
        posterior = torch.Generator(device=device).manual_seed(hash_key("|".join(map(str, keys))))
        return torch.stack(noise).to(device), torch.stack(timesteps).to(device), posterior


def check_cached_shards(cached: dict | None, family: Family, base: BaseModel, options: TextOptions, model: str) -> None:
    """Refuse cached shards that differ from what this model would encode from the images and captions.

    ``cached`` is the training shards' ``cached`` section (dataset.json of `lorafit cache`), None for
    uncached shards; checked at fit start so a mismatch fails before the first step rather than
    training on latents of another VAE or text embeddings of the wrong length or layer.
    """
    if not cached:
        return
    if cached.get("family") != family.name:
        raise LorafitError(
            f"data.shards hold latents cached with a {cached.get('family')} model ({cached.get('model')}); "
            f"this model is {family.name}: run `lorafit cache` with it"
        )
    if cached.get("model") != model:
        log.warning(
            "cached latents were made with %s; training %s (same family %s): fine if they share a VAE",
            cached.get("model"),
            model,
            family.name,
        )
    if cached.get("text_embeddings"):
        family.check_cache_settings(base, cached, options)
