"""The rectified-flow (flow matching) objective of Flux and later transformer families.

For a clean latent ``x0``, noise ``n`` and sigma ``s`` in (0, 1], the model sees
``(1 - s) * x0 + s * n`` and must predict the velocity ``n - x0``; the transformer takes ``s``
itself as its timestep (each family scales it as its pipeline does). Sigmas are drawn as the
anchors draw them (kohya's ``timestep_sampling``, SD3's ``logit_normal``) and shifted towards
noise by ``s*u / (1 + (s-1)*u)``: a fixed shift (SD3's 3.0, kohya's ``discrete_flow_shift``) or
Flux's resolution-dependent one, ``exp(mu)`` from the packed token count, exactly the shift
FluxPipeline samples with (kohya's ``flux_shift``). Loss weights are SD3's trainers' (``none``,
``sigma_sqrt``, ``cosmap``) and the prior-loss weight of regularization images.
"""

from __future__ import annotations

import math

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import Family
from lorafit.training import losses
from lorafit.training.config import LossConfig, NoiseConfig
from lorafit.training.ddpm import Draw


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * u / (1 + (shift - 1) * u)``: sigmas moved towards 1 (more noise) for ``shift > 1``."""
    return shift * u / (1 + (shift - 1) * u)


def flow_weight(sigmas: torch.Tensor, scheme: str) -> torch.Tensor | None:
    """SD3's per-sigma loss weights (diffusers' ``compute_loss_weighting_for_sd3``); None for ``none``."""
    if scheme == "sigma_sqrt":
        return sigmas.float().clamp(min=1e-4) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)).float()
    return None


class FlowMatchingObjective:
    """Velocity regression on the straight path from data to noise (see module docstring)."""

    def __init__(self, family: Family, scheduler_config: dict, noise: NoiseConfig, loss: LossConfig):
        self.family, self.scheduler_config, self.noise, self.loss_config = family, scheduler_config, noise, loss
        self.shift_mode = noise.shift if noise.shift is not None else self._default_shift(family)
        if self.shift_mode == "resolution" and family.resolution_shift(64, 64, scheduler_config) is None:
            raise LorafitError(f"model.noise.shift: {family.title} has no resolution-dependent shift; give a number")

    @staticmethod
    def _default_shift(family: Family) -> float | str:
        return "resolution" if family.resolution_shift(64, 64, {}) is not None else 1.0

    def shift_for(self, latent_size: tuple[int, int]) -> float:
        if self.shift_mode == "resolution":
            return self.family.resolution_shift(latent_size[0], latent_size[1], self.scheduler_config)
        return float(self.shift_mode)

    def sigmas(self, count: int, generator: torch.Generator, device, latent_size: tuple[int, int]) -> torch.Tensor:
        """``count`` training sigmas in (0, 1] for latents of ``latent_size`` (h, w)."""
        n = self.noise
        if n.timestep_sampling == "uniform":
            u = torch.rand(count, generator=generator, device=device)
        elif n.timestep_sampling == "logit_normal":
            u = torch.sigmoid(n.logit_mean + n.logit_std * torch.randn(count, generator=generator, device=device))
        else:  # sigmoid (kohya): sigmoid of a scaled standard normal
            u = torch.sigmoid(n.sigmoid_scale * torch.randn(count, generator=generator, device=device))
        return shifted(u, self.shift_for(latent_size))

    def draw(
        self,
        latents: torch.Tensor,
        generator: torch.Generator,
        global_rows: torch.Tensor | None = None,
        global_size: int | None = None,
    ) -> Draw:
        """Noise and sigmas for ``latents``; with ``global_rows`` drawn for the whole global batch
        (``global_size`` rows) and these rows kept, as one process would draw them."""
        shape = latents.shape if global_rows is None else (global_size, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator, device=latents.device)
        sigmas = self.sigmas(shape[0], generator, latents.device, tuple(latents.shape[-2:]))
        if global_rows is not None:
            rows = global_rows.to(latents.device)
            noise, sigmas = noise[rows], sigmas[rows]
        return self.at(latents, noise, sigmas)

    def at(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> Draw:
        """The draw at given noise and sigmas."""
        s = sigmas.to(latents.dtype).view(-1, *[1] * (latents.dim() - 1))
        return Draw((1 - s) * latents + s * noise, sigmas, noise - latents)

    def fixed_timestep(self, generator: torch.Generator, latent_size: tuple[int, int]) -> torch.Tensor:
        """One sigma for a held-out sample from its own generator, from the training distribution."""
        return self.sigmas(1, generator, "cpu", latent_size)[0]

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        sigmas: torch.Tensor,
        is_reg: torch.Tensor | None = None,
        share: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss weighted by the flow weighting and the prior-loss weight, averaged."""
        cfg = self.loss_config
        huber_c = None
        if cfg.type in ("huber", "smooth_l1"):
            huber_c = losses.flow_huber_threshold(sigmas, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale)
        per_sample = losses.per_sample_loss(prediction, target, cfg.type, huber_c, weight)
        return losses.weighted_mean(
            per_sample,
            losses.prior_weights(is_reg, per_sample.shape[0], cfg.prior_weight, per_sample.device),
            flow_weight(sigmas, cfg.weighting),
            share,
        )
