"""Noise, timesteps and loss weighting for diffusion training, as small pure functions.

Each knob keeps the meaning kohya's sd-scripts gives the option of the same name (so a recipe
carries over), and every random draw takes an explicit ``generator``: the module seeds one per
micro-batch, which keeps training exactly resumable. The module composes these in the order
kohya does: noise (+ offset, + pyramid) -> timesteps -> noisy input (+ input perturbation) ->
per-sample loss -> weights (prior, min-SNR, debiased) -> mean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]


def _strength(value: float, random_strength: bool, generator: torch.Generator, device) -> torch.Tensor | float:
    """``value``, or a uniform draw in ``[0, value)`` per batch (kohya's ``*_random_strength``)."""
    if not random_strength:
        return value
    return torch.rand(1, generator=generator, device=device) * value


def offset_noise(
    noise: torch.Tensor, offset: float, generator: torch.Generator, random_strength: bool = False
) -> torch.Tensor:
    """Add a per-sample, per-channel constant to the noise (kohya's ``noise_offset``).

    Lets the model shift a whole image's brightness, so it can learn very dark or bright images.
    """
    if not offset:
        return noise
    strength = _strength(offset, random_strength, generator, noise.device)
    shift = torch.randn((noise.shape[0], noise.shape[1], 1, 1), generator=generator, device=noise.device)
    return noise + strength * shift


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (kohya's ``multires_noise_iterations`` / ``multires_noise_discount``).

    Adds upsampled lower-resolution noise (level ``i`` weighted ``discount**i`` and ``r**i`` times
    coarser, ``r`` uniform in [2, 4) per level) and rescales the sum to unit standard deviation.
    kohya draws ``r`` from Python's ``random``; here it comes from a host generator seeded with
    ``generator``'s seed, so runs stay reproducible. (The sizes must be known on the host: drawing
    ``r`` on the GPU and reading it would make the host wait for the GPU at every level.)
    """
    if iterations <= 0:
        return noise
    batch, channels, height, width = noise.shape
    factors = torch.Generator().manual_seed(generator.initial_seed())
    result = noise
    for level in range(iterations):  # level 0 adds one more full-size draw, as in kohya
        factor = torch.rand(1, generator=factors).item() * 2 + 2
        h, w = max(1, int(height / factor**level)), max(1, int(width / factor**level))
        coarse = torch.randn((batch, channels, h, w), generator=generator, device=noise.device)
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break
    return result / result.std()


def perturbed_noise(
    noise: torch.Tensor, gamma: float, generator: torch.Generator, random_strength: bool = False
) -> torch.Tensor:
    """Input perturbation (kohya's ``ip_noise_gamma``): the noise *put into* the latents.

    The target stays the unperturbed noise; that mismatch is the regularizer (Ning et al. 2023).
    """
    if not gamma:
        return noise
    strength = _strength(gamma, random_strength, generator, noise.device)
    return noise + strength * torch.randn(noise.shape, generator=generator, device=noise.device)


def sample_timesteps(
    batch_size: int, generator: torch.Generator, min_timestep: int, max_timestep: int, device=None
) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (kohya's ``min/max_timestep``)."""
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, device=device)


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), float32 on ``timesteps``' device."""
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023; kohya's ``min_snr_gamma``, diffusers' ``snr_gamma``).

    epsilon: ``min(SNR, gamma) / SNR``; v-prediction: ``min(SNR, gamma) / (SNR + 1)``, as kohya and
    diffusers' text-to-image scripts define it.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def debiased_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation weight (kohya's ``debiased_estimation_loss``).

    epsilon: ``1 / sqrt(SNR)``; v-prediction: ``1 / (SNR + 1)``. SNR is capped at 1000 first, as
    kohya does, because it is huge at t=0.
    """
    snr = torch.clamp(snr, max=1000)
    if prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / torch.sqrt(snr)


def prior_weights(is_reg: torch.Tensor | None, batch_size: int, prior_loss_weight: float, device=None) -> torch.Tensor:
    """Per-sample weight: ``prior_loss_weight`` for regularization samples, 1 otherwise."""
    weights = torch.ones(batch_size, device=device)
    if is_reg is None:
        return weights
    return torch.where(is_reg.to(device=device, dtype=torch.bool), torch.full_like(weights, prior_loss_weight), weights)


def huber_threshold(
    timesteps: torch.Tensor,
    schedule: HuberSchedule,
    huber_c: float,
    huber_scale: float,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
) -> torch.Tensor:
    """kohya's per-sample Huber ``c`` for ``huber``/``smooth_l1`` losses.

    constant: ``c * scale``; exponential: ``exp(-a t) * scale`` with ``a = -ln(c) / T`` (``1`` at t=0,
    ``c`` at t=T); snr: ``(1 - c) / (1 + sigma_t)**2 + c`` with ``sigma_t = sqrt((1 - alpha_bar) /
    alpha_bar)`` (kohya applies no scale there either).
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        rate = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-rate * t) * huber_scale
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    sigma = torch.sqrt((1 - alpha_bar) / alpha_bar)
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


def flow_huber_threshold(
    sigmas: torch.Tensor, schedule: HuberSchedule, huber_c: float, huber_scale: float
) -> torch.Tensor:
    """:func:`huber_threshold` for flow matching, on sigmas in (0, 1] instead of DDPM timesteps.

    constant: ``c * scale``; exponential: ``exp(ln(c) * sigma) * scale`` (1 at no noise, ``c`` at pure
    noise, as the DDPM form over t/T); snr: ``(1 - c) / (1 + r)**2 + c`` with ``r = sigma / (1 - sigma)``,
    the noise-to-signal ratio that DDPM's ``sqrt((1 - alpha_bar) / alpha_bar)`` is.
    """
    s = sigmas.float()
    if schedule == "constant":
        return torch.full_like(s, huber_c * huber_scale)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * s) * huber_scale
    ratio = s / (1 - s).clamp(min=1e-6)
    return (1 - huber_c) / (1 + ratio) ** 2 + huber_c


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    loss_type: LossType = "l2",
    huber_c: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss per sample ([B]): the elementwise loss averaged over every other dimension.

    huber: ``2 c (sqrt(d^2 + c^2) - c)`` (pseudo-Huber, ~``d^2`` for small d, ~``2c|d|`` for large);
    smooth_l1: ``2 (sqrt(d^2 + c^2) - c)``; both with kohya's per-sample ``c`` ([B]). ``weight``
    (broadcast against the elementwise loss, e.g. a loss mask's [B, 1, h, w]) multiplies it first.
    """
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    elif loss_type == "l1":
        elementwise = F.l1_loss(prediction, target, reduction="none")
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = huber_c.float().view(-1, *([1] * (prediction.dim() - 1)))
        root = torch.sqrt((prediction - target) ** 2 + c**2) - c
        elementwise = 2 * c * root if loss_type == "huber" else 2 * root
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if weight is not None:
        elementwise = elementwise * weight.to(elementwise.dtype)
    return elementwise.mean(dim=tuple(range(1, elementwise.dim())))


def weighted_mean(per_sample: torch.Tensor, *weights: torch.Tensor | None) -> torch.Tensor:
    """``mean(loss_i * w1_i * w2_i ...)`` over the batch; ``None`` weights are skipped."""
    for weight in weights:
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
