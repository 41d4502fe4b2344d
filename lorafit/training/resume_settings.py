"""Which ``model.*`` settings a resumed run may change, and the one-line refusal for the others.

A checkpoint holds LoRA weights (and their optimizer state) trained for one network: its type,
ranks, alphas, the modules it adapts, the base model's family. Resuming with any of those changed
either fails deep inside Lightning (a page of size mismatches, an optimizer group of another
size) or, worse, runs: a changed ``alpha`` rescales every trained update, a part whose learning
rate went from 0 to positive starts from fresh random LoRA beside trained ones. So these are
compared before anything is loaded, and a difference stops the run naming every differing key
with both values.

Refused when changed (the network's identity):

* ``network.type``, ``rank``, ``alpha``, ``conv_rank``, ``conv_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``lokr_factor``: the adapter layers' shapes and scales;
* ``network.preset``, ``targets``, ``text_encoder_targets``, ``include``, ``exclude``,
  ``train_text_encoder``: which modules carry an adapter;
* ``embedding.token``, ``embedding.vectors``: the textual-inversion vectors' token and shape;
* ``conditioning.clip_skip`` (SD1/SD2; SDXL ignores it): which text-encoder layers' LoRA trains,
  and which hidden state the LoRA learnt to shape;
* the base model's family (``model.family``, detected from ``model.model``);
* which parts (UNet/transformer, each text encoder) have a LoRA at all: a learning rate of 0
  leaves a part without one, so the ``optimizer.*_lr`` rates may change their values but not go to
  or from 0.

Everything else may change on resume and the config's value is used: learning rates, optimizer
arguments, schedule, noise and loss settings, ``max_token_length``, dtypes, gradient checkpointing,
and ``model.model`` itself as long as the family stays (a moved folder, another copy of the same
weights); a different ``model.model`` is logged as a warning. Trainer keys (``max_epochs`` ...)
are not model settings and are never compared.

Learning rates and optimizer arguments need help for that: the optimizer state Lightning restores
carries the old run's values in its parameter groups (torch's ``load_state_dict`` takes them
over), so a changed ``learning_rate`` was silently ignored. :func:`use_configured_optimizer_settings`
rewrites them in the loaded checkpoint first: each group's rate is scaled to the configured one
(the schedule's position is kept: mid-warmup stays mid-warmup), and the arguments the config sets
(``weight_decay``, ``betas``, ``optimizer_args``) replace the saved ones. An argument removed from
the config (back to the optimizer's default) keeps the checkpoint's value. ``model.optimizer``
itself should not change on resume: the moment estimates of one optimizer mean nothing to another.

``None``, ``[]`` and ``{}`` count as the same (all mean "not set"), as do a list and a tuple, and
``4`` and ``4.0``. A key the checkpoint does not record (written by an older lorafit) is not compared;
checkpoints of lorafit versions with flat ``model.*`` keys are read through
:mod:`lorafit.training.legacy_keys`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lorafit.errors import LorafitError
from lorafit.networks.adapters import ADAPTER_NAME

log = logging.getLogger("lorafit.train")

NETWORK_KEYS = tuple(
    f"network.{key}"
    for key in (
        "type",
        "rank",
        "alpha",
        "conv_rank",
        "conv_alpha",
        "rank_pattern",
        "alpha_pattern",
        "lokr_factor",
        "dora_axis",
        "preset",
        "targets",
        "text_encoder_targets",
        "include",
        "exclude",
        "train_text_encoder",
    )
) + ("embedding.token", "embedding.vectors")  # textual inversion's vectors: which token, how many
# Parameter-name prefix of each part that can carry a LoRA -> the part's diffusers name.
_PART = re.compile(r"^(unet|transformer|text_encoders\.\d+)\.")
_PART_NAMES = {
    "unet": "unet",
    "transformer": "transformer",
    "text_encoders.0": "text_encoder",
    "text_encoders.1": "text_encoder_2",
}


def flat_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``{"network.rank": 8, ...}`` from grouped hyperparameters (or a checkpoint's flat old ones)."""
    from lorafit.training.legacy_keys import GROUPS, nest_model_settings

    nested = nest_model_settings(dict(hparams), warn=False)
    flat = {key: value for key, value in nested.items() if key not in GROUPS}
    for group in GROUPS:
        for key, value in dict(nested.get(group) or {}).items():
            flat[f"{group}.{key}"] = value
    return flat


def _normalised(value: Any) -> Any:
    if value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if isinstance(value, (list, tuple)):
        return [_normalised(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _normalised(item) for key, item in value.items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def changed_network_settings(
    saved: Mapping[str, Any], current: Mapping[str, Any], family: str | None = None
) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, config value)`` of every network-identity key that differs.

    Args:
        saved: The checkpoint's ``hyper_parameters``.
        current: The hyperparameters of the module being resumed.
        family: The base model's family; ``clip_skip`` is compared unless it is ``sdxl``.
    """
    keys = NETWORK_KEYS + (() if family in ("sdxl", "flux") else ("conditioning.clip_skip",))
    saved, current = flat_settings(saved), flat_settings(current)
    return [
        (key, saved[key], current.get(key))
        for key in keys
        if key in saved and _normalised(saved[key]) != _normalised(current.get(key))
    ]


def adapted_parts(parameter_names: Iterable[str]) -> list[str]:
    """The parts (``unet``, ``text_encoder``, ``text_encoder_2``) the LoRA parameter names belong to."""
    prefixes = {match.group(1) for name in parameter_names if (match := _PART.match(name))}
    return [_PART_NAMES.get(prefix, prefix) for prefix in sorted(prefixes, key=lambda p: (p != "unet", p))]


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _refusal(path: Any, differences: list[tuple[str, Any, Any]]) -> LorafitError:
    listed = "; ".join(
        f"{label}: {_shown(old)} in the checkpoint, {_shown(new)} in the config" for label, old, new in differences
    )
    return LorafitError(
        f"cannot resume from {path or 'the checkpoint'}: its LoRA was trained with other network settings: "
        f"{listed}. Resume with the checkpoint's settings, or start a new run (another "
        "trainer.default_root_dir, without --ckpt_path)"
    )


def refuse_changed_network_in_file(path: str | os.PathLike, hparams: Mapping[str, Any]) -> None:
    """The settings part of :func:`refuse_changed_network`, on a checkpoint file, before training starts.

    ``lorafit fit``/``validate`` call it before the trainer runs, so a refused resume leaves the run
    folder's ``config.yaml`` alone (it is rewritten at setup, before the checkpoint is loaded).
    What needs the built network (family, parts with a LoRA) is left to ``on_load_checkpoint``, as
    is a file this cannot read: that check still runs.

    Args:
        path: The checkpoint file.
        hparams: The model's hyperparameters as configured.
    """
    import torch

    try:  # weights_only: a checkpoint is plain tensors and containers (Lightning's CLI loads it so too)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable here: on_load_checkpoint reports it
        log.debug("resume settings not checked before training (%s); they are when the checkpoint loads", error)
        return
    saved = checkpoint.get("hyper_parameters") or {}
    differences = [
        (f"model.{key}", old, new)
        for key, old, new in changed_network_settings(saved, hparams, checkpoint.get("lorafit", {}).get("family"))
    ]
    if differences:
        raise _refusal(path, differences)


def refuse_changed_network(checkpoint: dict, module) -> None:
    """Raises a one-line LorafitError when ``module``'s network differs from the checkpoint's.

    Called from the module's ``on_load_checkpoint``, after ``configure_model`` built the network
    from the config, before any weight is loaded. See the module docstring for what is compared.

    Args:
        checkpoint: The checkpoint dictionary Lightning loaded.
        module: The configured :class:`~lorafit.training.module.LoraDiffusionModule` being resumed.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    saved_family = checkpoint.get("lorafit", {}).get("family")
    family = module.family if getattr(module, "base", None) is not None else None
    differences = [
        (f"model.{key}", old, new)
        for key, old, new in changed_network_settings(saved, module.hparams, family or saved_family)
    ]
    if saved_family and family and saved_family != family:
        differences.append(("model.family", saved_family, family))
    if not differences:  # else the parts follow from the differing keys; name those
        saved_parts = adapted_parts(checkpoint.get("state_dict", {}))
        parts = adapted_parts(name for name, _ in module.named_parameters() if f".{ADAPTER_NAME}" in name)
        if saved_parts and saved_parts != parts:
            differences.append(
                ("parts with a LoRA (a learning rate of 0 leaves a part without one)", saved_parts, parts)
            )
    if differences:
        try:
            path = module.trainer.ckpt_path
        except RuntimeError:  # not attached to a trainer (a direct on_load_checkpoint call)
            path = None
        raise _refusal(path, differences)
    if saved.get("model") and saved["model"] != module.hparams.get("model"):
        log.warning(
            "resuming a LoRA trained on %s with model.model %s (same family %s): fine if it is the same "
            "model moved or copied",
            saved["model"],
            module.hparams.get("model"),
            family or saved_family,
        )


def use_configured_optimizer_settings(
    checkpoint: dict, rates: Mapping[str, float], optimizer_arguments: Mapping[str, Any]
) -> None:
    """Rewrites the checkpoint's optimizer and scheduler state to the configured learning rates and arguments.

    Each parameter group (named ``unet``, ``text_encoder``, ``text_encoder_2``) and the matching
    scheduler entry are scaled by ``configured rate / saved base rate``, so the current rate keeps
    its place in the schedule. Groups without a rate (Adafactor's relative step) keep theirs.

    Args:
        checkpoint: The loaded checkpoint, changed in place before Lightning restores the optimizer.
        rates: The configured learning rate of each part (``LoraDiffusionModule.learning_rates``).
        optimizer_arguments: The configured optimizer constructor arguments (``optim.optimizer_kwargs``).
    """
    factors: list[float] = []
    for state in checkpoint.get("optimizer_states") or []:
        for group in state.get("param_groups", []):
            for key, value in optimizer_arguments.items():
                if key in group:
                    group[key] = value
            base = group.get("initial_lr", group.get("lr"))
            rate = rates.get(group.get("name"))
            factor = rate / base if rate is not None and base and group.get("lr") is not None else 1.0
            if factor != 1.0:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] = rate
            factors.append(factor)
    for scheduler in checkpoint.get("lr_schedulers") or []:
        for key in ("base_lrs", "_last_lr"):
            if len(scheduler.get(key) or []) == len(factors):
                scheduler[key] = [value * factor for value, factor in zip(scheduler[key], factors)]


def prepare_resume(checkpoint: dict, module) -> None:
    """What a resume checks and adjusts before Lightning loads the checkpoint into ``module``.

    Refuses a changed network (:func:`refuse_changed_network`), then makes the optimizer state use
    the configured learning rates and arguments (:func:`use_configured_optimizer_settings`).

    Args:
        checkpoint: The loaded checkpoint dictionary (``on_load_checkpoint``'s argument).
        module: The configured :class:`~lorafit.training.module.LoraDiffusionModule` being resumed.
    """
    from lorafit.training.optim import optimizer_kwargs

    refuse_changed_network(checkpoint, module)
    opt = module.optimizer_config
    use_configured_optimizer_settings(
        checkpoint, module.learning_rates(), optimizer_kwargs(opt.name, opt.weight_decay, opt.betas, opt.args)
    )
