"""The DDPM objective of the UNet families: noise on the model's own beta schedule, regress epsilon or v.

Noise follows the base model's scheduler config (beta schedule, length, prediction type), with
kohya's recipe options on top: offset and pyramid noise, input perturbation, a timestep window,
zero terminal SNR, and the loss weights Min-SNR-gamma and debiased estimation. Every draw takes
an explicit generator, so a step's noise depends only on its position in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError
from lorafit.training import losses
from lorafit.training.config import LossConfig, NoiseConfig


@dataclass
class Draw:
    """One noising of a batch: the denoiser's input, its timesteps (or sigmas), and what it must predict."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class DDPMObjective:
    """Epsilon / v-prediction training on a DDPM forward process (see module docstring)."""

    def __init__(self, scheduler_config: dict, prediction_type: str, noise: NoiseConfig, loss: LossConfig):
        from diffusers import DDPMScheduler

        if noise.zero_terminal_snr and prediction_type != "v_prediction":
            raise LorafitError(
                "model.noise.zero_terminal_snr needs a v-prediction model (at zero SNR an epsilon model cannot "
                "recover the image); set model.prediction_type: v_prediction or turn it off"
            )
        self.noise, self.loss_config, self.prediction_type = noise, loss, prediction_type
        # Training noise follows the model's own beta schedule; DDPM is the forward process.
        self.noise_scheduler = DDPMScheduler.from_config(
            scheduler_config, prediction_type=prediction_type, rescale_betas_zero_snr=noise.zero_terminal_snr
        )
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.max_timestep = self.num_train_timesteps if noise.max_timestep is None else noise.max_timestep
        if not 0 <= noise.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise LorafitError(
                f"model.noise.min_timestep/max_timestep: need 0 <= {noise.min_timestep} < {self.max_timestep} "
                f"<= {self.num_train_timesteps}"
            )

    def draw(
        self,
        latents: torch.Tensor,
        generator: torch.Generator,
        global_rows: torch.Tensor | None = None,
        global_size: int | None = None,
    ) -> Draw:
        """Noise, timesteps and the noisy input with the recipe's noise options.

        With ``global_rows`` every draw is made for the whole global batch of ``global_size`` and
        these rows are kept, so the ranks of a global batch together draw what one process would.
        """
        n = self.noise
        shape = latents.shape if global_rows is None else (global_size, *latents.shape[1:])
        device = latents.device
        noise = torch.randn(shape, generator=generator, device=device)
        timesteps = losses.sample_timesteps(shape[0], generator, n.min_timestep, self.max_timestep, device)
        noise = losses.offset_noise(noise, n.offset, generator, n.offset_random_strength)
        noise = losses.pyramid_noise(noise, generator, n.multires_iterations, n.multires_discount)
        model_noise = losses.perturbed_noise(noise, n.ip_gamma, generator, n.ip_gamma_random_strength)
        if global_rows is not None:
            rows = global_rows.to(device)
            noise, model_noise, timesteps = noise[rows], model_noise[rows], timesteps[rows.to(timesteps.device)]
        noisy = self.noise_scheduler.add_noise(latents, model_noise, timesteps)
        return Draw(noisy, timesteps, self.target(latents, noise, timesteps))

    def at(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Draw:
        """The draw at given noise and timesteps (evaluation at fixed points: no recipe noise options)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return Draw(noisy, timesteps, self.target(latents, noise, timesteps))

    def fixed_timestep(self, generator: torch.Generator, latent_size: tuple[int, int]) -> torch.Tensor:
        """One timestep for a held-out sample, drawn from its own generator (validation)."""
        return torch.randint(0, self.num_train_timesteps, (), generator=generator)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        is_reg: torch.Tensor | None = None,
        share: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss, weighted by prior-loss, min-SNR and debiased weights, averaged over the batch.

        ``share`` weighs a rank's rows of a global batch (see lorafit.data.stream.global_share);
        ``weight`` each element (a loss mask, :mod:`lorafit.training.masked_loss`).
        """
        cfg = self.loss_config
        alphas_cumprod = self.noise_scheduler.alphas_cumprod
        huber_c = None
        if cfg.type in ("huber", "smooth_l1"):
            huber_c = losses.huber_threshold(
                timesteps, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale, alphas_cumprod, self.num_train_timesteps
            )
        per_sample = losses.per_sample_loss(prediction, target, cfg.type, huber_c, weight)
        snr = losses.signal_to_noise(alphas_cumprod, timesteps)
        return losses.weighted_mean(
            per_sample,
            losses.prior_weights(is_reg, per_sample.shape[0], cfg.prior_weight, per_sample.device),
            losses.min_snr_weight(snr, cfg.min_snr_gamma, self.prediction_type) if cfg.min_snr_gamma else None,
            losses.debiased_weight(snr, self.prediction_type) if cfg.debiased_estimation else None,
            share,
        )
