"""Optimizers and learning-rate schedules by kohya's names, built from the field's libraries.

Optimizers: torch (AdamW), bitsandbytes (AdamW8bit, Lion8bit), transformers (Adafactor),
prodigyopt (Prodigy), lion-pytorch (Lion). Optional ones are imported only when chosen, with a
one-line error naming the extra to install. Schedules come from ``diffusers.optimization``.

Lion: kohya's ``Lion`` is lion-pytorch's, a pure-PyTorch implementation that runs on every device
(CUDA, MPS, CPU) without compiled kernels; ``Lion8bit`` is bitsandbytes', whose 8-bit state is the
reason to use it. Both implement the same update rule (Chen et al. 2023).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Literal

import torch

from lorafit.errors import LorafitError
from lorafit.io.optional_imports import BITSANDBYTES, allow_import

log = logging.getLogger("lorafit.training.optim")

OptimizerName = Literal["AdamW", "AdamW8bit", "Adafactor", "Prodigy", "Lion", "Lion8bit"]
SchedulerName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]

# name -> (module, class, pip extra or None for always-installed packages)
_OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", None),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bnb"),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bnb"),
    "Adafactor": ("transformers.optimization", "Adafactor", None),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigy"),
    "Lion": ("lion_pytorch", "Lion", "lion"),
}


def optimizer_class(name: str) -> type:
    """The optimizer class for kohya's ``optimizer_type`` ``name``, imported now."""
    if name not in _OPTIMIZERS:
        raise LorafitError(f"model.optimizer: {name!r} is not one of {', '.join(_OPTIMIZERS)}")
    module_name, class_name, extra = _OPTIMIZERS[name]
    if module_name.startswith(BITSANDBYTES):
        allow_import(BITSANDBYTES)  # the CLI keeps it unimportable until asked for (lorafit/io/optional_imports.py)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LorafitError(
            f"model.optimizer: {name} needs {module_name.split('.')[0]} ({error}); "
            f"install it with `pip install lorafit[{extra}]`"
        ) from None
    return getattr(module, class_name)


def optimizer_kwargs(
    name: str,
    weight_decay: float | None = None,
    betas: tuple[float, float] | None = None,
    optimizer_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Constructor arguments for optimizer ``name``, checked for the combinations that cannot work.

    ``weight_decay``/``betas`` left empty keep the optimizer's own defaults (AdamW 0.01 and
    (0.9, 0.999); Lion 0 and (0.9, 0.99); ...). ``optimizer_args`` are passed on unchanged, like
    kohya's ``--optimizer_args``.
    """
    kwargs = dict(optimizer_args or {})
    for key, value in (("weight_decay", weight_decay), ("betas", betas)):
        if value is None:
            continue
        if key in kwargs:
            raise LorafitError(f"model.{key} and model.optimizer_args.{key} are both set; keep one")
        kwargs[key] = tuple(value) if key == "betas" else value
    if name == "Adafactor":
        if "betas" in kwargs:
            raise LorafitError("model.betas: Adafactor has no betas; pass beta1 in model.optimizer_args")
        kwargs.setdefault("relative_step", True)  # transformers' and kohya's default
        if kwargs.get("warmup_init") and not kwargs["relative_step"]:
            raise LorafitError("model.optimizer_args: Adafactor's warmup_init=true needs relative_step=true")
    return kwargs


def build_optimizer(
    name: str, param_groups: list[dict], learning_rate: float, kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """Create optimizer ``name`` over ``param_groups`` (each with its own ``lr`` and ``name``)."""
    cls = optimizer_class(name)
    rates = {group["name"]: group["lr"] for group in param_groups}
    if name == "Prodigy" and len(set(rates.values())) > 1:
        # Prodigy estimates one step size for all groups and raises mid-training on differing ones.
        raise LorafitError(
            f"model.optimizer: Prodigy adapts one learning rate for all parts, got {rates}; set "
            "unet_lr/text_encoder_lr/text_encoder_2_lr equal (usually 1.0) or leave them empty"
        )
    if name == "Adafactor" and kwargs["relative_step"]:
        # Adafactor then computes its own step size and rejects a manual lr (kohya does the same).
        log.warning(
            "Adafactor with relative_step=true ignores the learning rates and lr_scheduler; set "
            "model.optimizer_args {relative_step: false, scale_parameter: false, warmup_init: false} "
            "to use them"
        )
        learning_rate = None
        param_groups = [{k: v for k, v in group.items() if k != "lr"} for group in param_groups]
    if name == "AdamW" and not {"fused", "foreach"} & kwargs.keys() and _fused_capable(param_groups):
        # torch's default AdamW on the CPU updates one tensor at a time in Python (foreach only on
        # CUDA): with a LoRA's hundreds of small tensors that loop is a visible share of the step
        # (toy demo: 18 ms of ~450). The fused kernel does the same update in one pass on CPU and CUDA
        # (benchmarks/RESULTS.md, "Per-step overhead"). optimizer_args {fused: false} restores it.
        kwargs = {**kwargs, "fused": True}
    try:
        return cls(param_groups, lr=learning_rate, **kwargs)
    except (TypeError, ValueError) as error:
        raise LorafitError(f"model.optimizer_args: {name} rejected {kwargs} ({error})") from None


def _fused_capable(param_groups: list[dict]) -> bool:
    """Whether torch's fused AdamW takes every parameter: floating tensors on the CPU or CUDA."""
    params = [p for group in param_groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def describe(name: str, kwargs: dict[str, Any]) -> str:
    """``module.Class(key=value,...)``, the form of kohya's ``ss_optimizer`` metadata."""
    module_name, class_name, _ = _OPTIMIZERS[name]
    return f"{module_name}.{class_name}({','.join(f'{k}={v}' for k, v in kwargs.items())})"


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    return any(group.get("relative_step") for group in optimizer.param_groups)


def warmup_steps(lr_warmup_steps: float, total_steps: float) -> int:
    """kohya's ``lr_warmup_steps``: a step count when >= 1, a fraction of ``total_steps`` when < 1."""
    if lr_warmup_steps < 0:
        raise LorafitError(f"model.lr_warmup_steps: {lr_warmup_steps} is negative")
    if lr_warmup_steps >= 1:
        return int(lr_warmup_steps)
    if lr_warmup_steps and total_steps == float("inf"):
        raise LorafitError("model.lr_warmup_steps: a ratio needs a known run length; set trainer.max_steps")
    return int(lr_warmup_steps * total_steps) if lr_warmup_steps else 0


_NEEDS_TOTAL = {"linear", "cosine", "cosine_with_restarts", "polynomial"}


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: float,
    lr_warmup_steps: float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """diffusers' schedule ``name``, to be stepped once per optimizer step.

    ``total_steps`` is the run's optimizer-step count (Lightning's ``estimated_stepping_batches``,
    which accounts for epochs, ``max_steps`` and gradient accumulation). None for Adafactor with
    ``relative_step``, whose own step size replaces any schedule (warned in build_optimizer).
    """
    from diffusers.optimization import get_scheduler

    if uses_relative_step(optimizer):
        return None
    if name in _NEEDS_TOTAL and total_steps == float("inf"):
        raise LorafitError(
            f"model.lr_scheduler: {name} needs a known run length; set trainer.max_steps or "
            "trainer.max_epochs with a sized dataset"
        )
    warmup = warmup_steps(lr_warmup_steps, total_steps)
    if name == "constant" and warmup:
        raise LorafitError(
            "model.lr_warmup_steps: the constant scheduler has no warmup; use lr_scheduler: constant_with_warmup"
        )
    total = None if total_steps == float("inf") else int(total_steps)
    if name in _NEEDS_TOTAL and warmup >= total:
        raise LorafitError(
            f"model.lr_warmup_steps: warmup ({warmup} steps) must be shorter than the run ({total} steps)"
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles, power=power
    )


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The step size each named param group actually gets, by group ``name``.

    Plain optimizers: the group's ``lr`` (after the schedule). Prodigy: ``d * lr``, its adapted rate.
    Adafactor with relative_step: the step size its next update will use for the group's first
    parameter (kohya logs the same parameter's).
    """
    rates = {}
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name", f"group{index}")
        if group.get("relative_step"):
            first = group["params"][0]
            # Adafactor.step increments the step count and measures the weight's RMS before _get_lr.
            upcoming = {
                "step": optimizer.state.get(first, {}).get("step", 0) + 1,
                "RMS": float(optimizer._rms(first.detach().float())),
            }
            rates[name] = float(optimizer._get_lr(group, upcoming))
        elif "d" in group:  # Prodigy
            rates[name] = float(group["d"] * group["lr"])
        else:
            rates[name] = float(group["lr"])
    return rates


def lightning_optimizers(opt, groups: list[dict], total_steps: float):
    """What ``configure_optimizers`` returns for the ``model.optimizer`` settings ``opt`` and the named
    parameter ``groups``: the optimizer, with its schedule stepped every optimizer step when it has one."""
    optimizer = build_optimizer(
        opt.name, groups, opt.learning_rate, optimizer_kwargs(opt.name, opt.weight_decay, opt.betas, opt.args)
    )
    scheduler = build_scheduler(
        opt.lr_scheduler,
        optimizer,
        total_steps,
        opt.lr_warmup_steps,
        opt.lr_scheduler_num_cycles,
        opt.lr_scheduler_power,
    )
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def part_learning_rates(
    opt,
    denoiser: str,
    text_encoders: tuple[str, ...] = (),
    embedding_lr: float | None = None,
) -> dict[str, float]:
    """Learning rate of each part that may train: the ``denoiser`` component, the ``text_encoders``
    that train (first and second: kohya's ``text_encoder_lr`` and its SDXL split) and textual
    inversion's vectors (``embedding``, when ``embedding_lr`` is given; 0 = the base rate); 0 = frozen."""
    rates = {denoiser: opt.learning_rate if opt.denoiser_lr is None else opt.denoiser_lr}
    first = opt.learning_rate if opt.text_encoder_lr is None else opt.text_encoder_lr
    second = first if opt.text_encoder_2_lr is None else opt.text_encoder_2_lr
    rates.update(dict(zip(("text_encoder", "text_encoder_2"), (first, second))))
    rates = {name: rate for name, rate in rates.items() if name == denoiser or name in text_encoders}
    if embedding_lr is not None:
        rates["embedding"] = embedding_lr or opt.learning_rate
    return rates
