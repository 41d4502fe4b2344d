"""One in-memory form of a trained network, between the live PEFT model and every file format.

A ``LoraWeights`` maps component (``unet``, ``text_encoder``, ``text_encoder_2`` — diffusers'
names) to module name (as ``named_modules()`` of that component spells it) to that module's
weights: a :class:`LoraModuleWeights` (LoRA, LoCon, DoRA) or one of the LyCORIS kinds in
:mod:`lorafit.networks.lycoris_weights` (LoHa, LoKr). Each kind keeps its tensors under the
kohya/LyCORIS part names (``lora_down.weight``, ``hada_w1_a``, ``lokr_w1`` ...) and its true
``alpha``, so formats only rename keys around it and conversions are exact by construction.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lycoris_weights import LohaModuleWeights, LokrModuleWeights

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModuleWeights:
    """LoRA (LoCon on convolutions): ``W' = W + alpha / rank * up @ down``; rank = ``down.shape[0]``.

    With ``dora_scale`` it is DoRA: ``W' = dora_scale * V / ||V||`` with ``V = W + alpha / rank *
    up @ down``. Its shape says along which axis the norm is taken (:attr:`dora_axis`), as LyCORIS,
    ComfyUI and Forge tell the two apart:

    - per output channel, ``[out, 1]`` (``[out, 1, 1, 1]`` for a conv): PEFT's DoRA (the paper's),
      LyCORIS >= 3.2 (``wd_on_output=True``, its default) and lorafit's training;
    - per input channel, ``[1, in]`` (``[1, in, 1, 1]``): LyCORIS before 3.2, OneTrainer's default,
      and the only one A1111 reads.

    Convolutions: ``down`` is ``[rank, in, kh, kw]``, ``up`` is ``[out, rank, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None

    REQUIRED: ClassVar[frozenset] = frozenset({"lora_down.weight", "lora_up.weight"})
    OPTIONAL: ClassVar[frozenset] = frozenset({"dora_scale"})
    PREFIXES: ClassVar[tuple] = ("lora_", "dora_")

    @property
    def kind(self) -> str:
        return "dora" if self.dora_scale is not None else "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def dora_axis(self) -> int | None:
        """0: DoRA magnitudes per output channel, 1: per input channel; None: no DoRA or neither shape."""
        if self.dora_scale is None:
            return None
        shape, trailing = tuple(self.dora_scale.shape), (1,) * (self.up.dim() - 2)
        if shape == (self.up.shape[0], 1, *trailing):
            return 0
        if shape == (1, self.down.shape[1], *trailing):
            return 1
        return None

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors under their kohya/LyCORIS part names (``alpha`` is written separately)."""
        parts = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        if self.dora_scale is not None:
            parts["dora_scale"] = self.dora_scale
        return parts

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], alpha: float | None) -> LoraModuleWeights:
        down, up, dora_scale = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("dora_scale")
        module = cls(down, up, float(down.shape[0]) if alpha is None else alpha, dora_scale)
        if dora_scale is not None and module.dora_axis is None:
            trailing = (1,) * (up.dim() - 2)
            raise LorafitError(
                f"dora_scale {tuple(dora_scale.shape)} is neither per output channel {(up.shape[0], 1, *trailing)} "
                f"nor per input channel {(1, down.shape[1], *trailing)}"
            )
        # No alpha tensor means alpha = rank (scale 1), as kohya, A1111 and ComfyUI read it.
        return module

    def to(self, dtype: torch.dtype) -> LoraModuleWeights:
        scale = None if self.dora_scale is None else self.dora_scale.to(dtype)
        return replace(self, down=self.down.to(dtype), up=self.up.to(dtype), dora_scale=scale)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W' - W`` (float32); DoRA needs the base weight ``W`` for its normalisation."""
        scale = self.alpha / self.rank
        down, up = self.down.float(), self.up.float()
        if down.dim() == 4:
            lora = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            lora = up @ down
        lora = scale * lora
        if self.dora_scale is None:
            return lora
        if base_weight is None:
            raise ValueError("a DoRA module's update depends on the base weight; pass base_weight")
        merged = base_weight.float() + lora.reshape(base_weight.shape)
        return self.dora_scale.float() * merged / dora_norm(merged, self.dora_axis) - base_weight.float()


def dora_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """The norm of ``weight`` per output (``axis`` 0) or input (1) channel, shaped to broadcast against it."""
    moved = weight.transpose(0, axis)
    norm = moved.reshape(moved.shape[0], -1).norm(dim=1).reshape(moved.shape[0], *[1] * (weight.dim() - 1))
    return norm.transpose(0, axis)


ModuleWeights = LoraModuleWeights | LohaModuleWeights | LokrModuleWeights
LoraWeights = dict[str, dict[str, ModuleWeights]]
MODULE_TYPES: tuple[type, ...] = (LoraModuleWeights, LohaModuleWeights, LokrModuleWeights)


def module_from_parts(parts: dict[str, torch.Tensor], where: str) -> ModuleWeights:
    """Build the module weights of whichever kind ``parts`` (kohya/LyCORIS part name -> tensor) are.

    Unknown or missing parts are an error naming ``where``: silently dropping part of a network is
    how "my LoRA does nothing" bugs start.
    """
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    names = set(parts) - {"alpha"}
    for module_type in MODULE_TYPES:
        if any(name.startswith(module_type.PREFIXES) for name in names):
            missing = module_type.REQUIRED - names
            unknown = names - module_type.REQUIRED - module_type.OPTIONAL
            if missing or unknown:
                raise LorafitError(
                    f"{where} has parts {sorted(names)}: "
                    + (f"missing {sorted(missing)}" if missing else f"unsupported {sorted(unknown)}")
                )
            try:
                return module_type.from_parts(parts, alpha)
            except LorafitError as error:
                raise LorafitError(f"{where}: {error}") from None
    raise LorafitError(f"{where} has parts {sorted(names)}, not LoRA/LoCon/DoRA/LoHa/LoKr (unsupported network type)")


def cast(weights: LoraWeights, dtype: torch.dtype) -> LoraWeights:
    """A copy with every tensor in ``dtype`` (alphas are plain floats and stay exact)."""
    return {component: {name: m.to(dtype) for name, m in modules.items()} for component, modules in weights.items()}


def network_kinds(weights: LoraWeights) -> set[str]:
    """The kinds present (``lora``, ``dora``, ``loha``, ``lokr``)."""
    return {m.kind for modules in weights.values() for m in modules.values()}


def peft_config_for(modules: dict[str, LoraModuleWeights]) -> dict:
    """A LoraConfig dict reproducing every module's rank and alpha (diffusers' ``lora_adapter_metadata``).

    The most common rank/alpha become ``r``/``lora_alpha``; any other module gets an exact
    (escaped, full-name) entry in ``rank_pattern``/``alpha_pattern``, which PEFT matches as regexes.
    """
    kinds = {m.kind for m in modules.values()}
    if not kinds <= {"lora", "dora"} or len(kinds) != 1:
        raise LorafitError(f"diffusers/PEFT LoRA format holds plain LoRA or DoRA modules, not a mix of {sorted(kinds)}")
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(n): m.rank for n, m in modules.items() if m.rank != rank},
        "alpha_pattern": {re.escape(n): m.alpha for n, m in modules.items() if m.alpha != alpha},
        "init_lora_weights": True,
        "use_dora": kinds == {"dora"},
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def alpha_from_config(config: dict, module: str) -> float:
    """The alpha PEFT would give ``module`` under ``config`` (pattern first, then the default)."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(config.get("lora_alpha", config.get("r", 8)))


def delta_weight(module: ModuleWeights, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The full update ``W' - W`` of one module (reshaped to the base weight's shape when given)."""
    delta = module.delta_weight(base_weight)
    return delta if base_weight is None else delta.reshape(base_weight.shape)
