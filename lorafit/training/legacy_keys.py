"""The flat ``model.*`` keys of lorafit before the settings were grouped, mapped onto the groups.

Old configs, run folders' ``config.yaml``, command lines and checkpoints keep working: each old
key is rewritten to its place (``model.rank`` -> ``model.network.rank``) with one notice per key
naming the new spelling. The CLI renames flags and ``--config`` keys through
:mod:`lorafit.cli.renamed` with this table; Python callers and the saved settings of older
checkpoints (compared on resume) go through :func:`nest_model_settings`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger("lorafit.config")

# old flat key -> (group, field)
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "rank": ("network", "rank"),
    "alpha": ("network", "alpha"),
    "network_type": ("network", "type"),
    "target_preset": ("network", "preset"),
    "unet_target_modules": ("network", "targets"),
    "include": ("network", "include"),
    "exclude": ("network", "exclude"),
    "conv_rank": ("network", "conv_rank"),
    "conv_alpha": ("network", "conv_alpha"),
    "rank_pattern": ("network", "rank_pattern"),
    "alpha_pattern": ("network", "alpha_pattern"),
    "lokr_factor": ("network", "lokr_factor"),
    "train_text_encoder": ("network", "train_text_encoder"),
    "text_encoder_target_modules": ("network", "text_encoder_targets"),
    "learning_rate": ("optimizer", "learning_rate"),
    "unet_lr": ("optimizer", "denoiser_lr"),
    "text_encoder_lr": ("optimizer", "text_encoder_lr"),
    "text_encoder_2_lr": ("optimizer", "text_encoder_2_lr"),
    "weight_decay": ("optimizer", "weight_decay"),
    "betas": ("optimizer", "betas"),
    "optimizer_args": ("optimizer", "args"),
    "lr_scheduler": ("optimizer", "lr_scheduler"),
    "lr_warmup_steps": ("optimizer", "lr_warmup_steps"),
    "lr_scheduler_num_cycles": ("optimizer", "lr_scheduler_num_cycles"),
    "lr_scheduler_power": ("optimizer", "lr_scheduler_power"),
    "noise_offset": ("noise", "offset"),
    "noise_offset_random_strength": ("noise", "offset_random_strength"),
    "multires_noise_iterations": ("noise", "multires_iterations"),
    "multires_noise_discount": ("noise", "multires_discount"),
    "ip_noise_gamma": ("noise", "ip_gamma"),
    "ip_noise_gamma_random_strength": ("noise", "ip_gamma_random_strength"),
    "zero_terminal_snr": ("noise", "zero_terminal_snr"),
    "min_timestep": ("noise", "min_timestep"),
    "max_timestep": ("noise", "max_timestep"),
    "loss_type": ("loss", "type"),
    "huber_schedule": ("loss", "huber_schedule"),
    "huber_c": ("loss", "huber_c"),
    "huber_scale": ("loss", "huber_scale"),
    "min_snr_gamma": ("loss", "min_snr_gamma"),
    "debiased_estimation_loss": ("loss", "debiased_estimation"),
    "prior_loss_weight": ("loss", "prior_weight"),
    "clip_skip": ("conditioning", "clip_skip"),
    "max_token_length": ("conditioning", "max_token_length"),
    "gradient_checkpointing": ("memory", "gradient_checkpointing"),
    "channels_last": ("memory", "channels_last"),
    "compile_unet": ("memory", "compile"),
}
GROUPS = ("network", "optimizer", "noise", "loss", "conditioning", "memory", "embedding")


def nest_model_settings(settings: dict[str, Any], where: str = "", warn: bool = True) -> dict[str, Any]:
    """``settings`` (a ``model:`` mapping) with every old flat key moved into its group.

    ``model.optimizer: AdamW`` (the old optimizer name, a string) becomes ``optimizer.name``. A key
    given both ways keeps the grouped value.
    """
    out = dict(settings)
    moved = []
    if isinstance(out.get("optimizer"), str):
        out["optimizer"] = {"name": out["optimizer"]}
        moved.append(("optimizer", "optimizer.name"))
    for old, (group, name) in LEGACY_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        section = dict(out.get(group) or {})
        section.setdefault(name, value)
        out[group] = section
        moved.append((old, f"{group}.{name}"))
    if warn:
        for old, new in moved:
            log.warning("%smodel.%s is now model.%s; the old key still works", f"{where}: " if where else "", old, new)
    return out


def settings_groups(groups: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
    """Each ``model.*`` group as its dataclass, from the dataclass itself or a mapping (Python callers
    and old checkpoints pass dicts), with the flat ``legacy`` keys merged into their groups."""
    # Imported here: the CLI reads LEGACY_KEYS before anything imports torch (config's dataclasses do).
    from lorafit.errors import LorafitError
    from lorafit.training import config

    types = {
        "network": config.NetworkConfig,
        "optimizer": config.OptimizerConfig,
        "noise": config.NoiseConfig,
        "loss": config.LossConfig,
        "conditioning": config.ConditioningConfig,
        "memory": config.MemoryConfig,
        "prior": config.PriorConfig,
        "embedding": config.EmbeddingConfig,
        "slider": config.SliderConfig,
    }

    def build(name: str, value: Any):
        return value if isinstance(value, types[name]) else types[name](**dict(value or {}))

    groups = dict(groups)
    if legacy:
        nested = nest_model_settings(legacy, where="LoraDiffusionModule")
        unknown = sorted(set(nested) - set(GROUPS))
        if unknown:
            raise LorafitError(f"model: unknown setting(s) {unknown}; see `lorafit fit --help`")
        for name in GROUPS:
            if name in nested:
                groups[name] = {**dataclasses.asdict(build(name, groups[name])), **nested[name]}
    return {name: build(name, value) for name, value in groups.items()}
