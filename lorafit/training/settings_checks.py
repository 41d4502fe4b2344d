"""Checks of the ``model.*`` settings against each other, run before any weights load: each impossible
or silently ineffective combination is one line naming the key and what to do (the groups themselves:
:mod:`lorafit.training.config`)."""

from __future__ import annotations

from lorafit.errors import LorafitError
from lorafit.training.config import (
    ConditioningConfig,
    LossConfig,
    NetworkConfig,
    NoiseConfig,
    OptimizerConfig,
    PriorConfig,
)
from lorafit.training.optim import optimizer_kwargs

_DDPM_ONLY = {
    "noise.offset": lambda n, loss: n.offset,
    "noise.multires_iterations": lambda n, loss: n.multires_iterations,
    "noise.ip_gamma": lambda n, loss: n.ip_gamma,
    "noise.zero_terminal_snr": lambda n, loss: n.zero_terminal_snr,
    "noise.min_timestep": lambda n, loss: n.min_timestep,
    "noise.max_timestep": lambda n, loss: n.max_timestep is not None,
    "loss.min_snr_gamma": lambda n, loss: loss.min_snr_gamma is not None,
    "loss.debiased_estimation": lambda n, loss: loss.debiased_estimation,
}


def check_settings(
    network: NetworkConfig,
    optimizer: OptimizerConfig,
    noise: NoiseConfig,
    loss: LossConfig,
    conditioning: ConditioningConfig,
) -> None:
    """Fail on impossible values with one line naming the key, before any weights are read."""
    if network.rank < 1:
        raise LorafitError(f"model.network.rank: {network.rank}; a rank must be >= 1 (16 or 32 are usual)")
    if network.dora_axis == "input" and network.type != "dora":
        raise LorafitError(f"model.network.dora_axis: 'input' applies to type dora, not {network.type!r}")
    if network.alpha is not None and network.alpha <= 0:
        raise LorafitError(
            f"model.network.alpha: {network.alpha} trains nothing (alpha 0 also reads as alpha = rank in kohya and "
            "A1111); use e.g. 1 (kohya's default) or leave it empty for alpha = rank"
        )
    for key in ("learning_rate", "denoiser_lr", "text_encoder_lr", "text_encoder_2_lr"):
        if (getattr(optimizer, key) or 0) < 0:
            raise LorafitError(
                f"model.optimizer.{key}: {getattr(optimizer, key)} is negative; use 0 to freeze that part"
            )
    optimizer_kwargs(optimizer.name, optimizer.weight_decay, optimizer.betas, optimizer.args)  # raises on conflicts
    if loss.min_snr_gamma is not None and loss.min_snr_gamma <= 0:
        raise LorafitError(
            f"model.loss.min_snr_gamma: {loss.min_snr_gamma} must be > 0 (5 is usual); leave empty for off"
        )
    if not 0.0 <= loss.mask_floor <= 1.0:
        raise LorafitError(
            f"model.loss.mask_floor: {loss.mask_floor} must be in [0, 1] (0 = background not learnt, 1 = masks ignored)"
        )
    if loss.type in ("huber", "smooth_l1") and not 0 < loss.huber_c <= 1:
        raise LorafitError(f"model.loss.huber_c: {loss.huber_c} must be in (0, 1]")
    if conditioning.max_token_length is not None and conditioning.max_token_length < 1:
        raise LorafitError(
            f"model.conditioning.max_token_length: {conditioning.max_token_length}; use 150 or 225, or leave it empty"
        )
    if noise.max_timestep is not None and not 0 <= noise.min_timestep < noise.max_timestep:
        raise LorafitError(
            f"model.noise.min_timestep/max_timestep: need 0 <= {noise.min_timestep} < {noise.max_timestep}"
        )
    if isinstance(noise.shift, (int, float)) and noise.shift <= 0:
        raise LorafitError(f"model.noise.shift: {noise.shift} must be > 0 (1 = no shift, 3 is SD3's)")
    if noise.logit_std <= 0 or noise.sigmoid_scale <= 0:
        raise LorafitError("model.noise.logit_std and model.noise.sigmoid_scale must be > 0")


def check_prior(prior: PriorConfig) -> None:
    """Fail on an impossible output-preserving prior (one line naming the key)."""
    if prior.weight < 0:
        raise LorafitError(f"model.prior.weight: {prior.weight} is negative; use 0 (off) or e.g. 1.0")
    if prior.weight > 0 and not (prior.class_word or "").strip():
        raise LorafitError(
            "model.prior.class_word: the output-preserving prior needs the class the trigger belongs to "
            "(e.g. dog); the trigger is replaced by it in the preserved prompts"
        )


def check_objective_settings(
    objective: str, family_title: str, noise: NoiseConfig, loss: LossConfig, network: NetworkConfig
) -> None:
    """Refuse settings the family's objective would silently ignore (one line naming the key)."""
    if objective == "flow":
        used = [key for key, value in _DDPM_ONLY.items() if value(noise, loss)]
        if used:
            raise LorafitError(
                f"model.{used[0]}: a DDPM setting, but {family_title} trains by flow matching; remove it (flow "
                "families use model.noise.timestep_sampling/shift and model.loss.weighting)"
            )
        if network.type == "locon":
            raise LorafitError(
                f"model.network.type: locon adds LoRA to convolutions, which {family_title}'s "
                "transformer does not have; use lora"
            )
    elif loss.weighting != "none":
        raise LorafitError(
            f"model.loss.weighting: {loss.weighting} is for flow-matching families; "
            f"{family_title} uses model.loss.min_snr_gamma / debiased_estimation"
        )
