"""Network types (LoRA, LoCon, LoHa, LoKr, DoRA) as PEFT configs, with a rank and alpha per module.

All five come from PEFT; lorafit only decides which modules get which rank and alpha:

- ``lora``: ``W + alpha / r * B A`` (PEFT ``LoraConfig``), on whatever the preset selects.
- ``locon``: ``lora`` that also covers the convolutions of ResNet/Down/Upsample blocks (kohya's
  ``networks.lora`` with ``conv_dim``); PEFT's LoRA on a Conv2d is a k x k down conv and a 1x1 up conv.
- ``loha``: Hadamard product of two low-rank pairs (``LoHaConfig``; LyCORIS ``algo=loha``).
- ``lokr``: Kronecker product of two factors (``LoKrConfig``; LyCORIS ``algo=lokr``, ``factor``).
- ``dora``: LoRA with a learnt magnitude per output channel (``LoraConfig(use_dora=True)``;
  LyCORIS ``dora_wd``), or per input channel with ``dora_axis="input"`` (a plain ``LoraConfig``
  plus :mod:`lorafit.networks.input_dora`; LyCORIS ``wd_on_output=False``, OneTrainer's default):
  the decomposition A1111 and ComfyUI merge exactly, which diffusers/PEFT cannot load.

Convolutions with a kernel larger than 1x1 take ``conv_rank``/``conv_alpha`` (kohya's
``conv_dim``/``conv_alpha``); ``rank_pattern``/``alpha_pattern`` regexes override both per module.
Everything ends up as exact per-module entries in PEFT's own ``rank_pattern``/``alpha_pattern``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.networks.presets import is_spatial_conv, matches

NetworkType = Literal["lora", "locon", "loha", "lokr", "dora"]
DoraAxis = Literal["output", "input"]
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
# What kohya/LyCORIS record in ``ss_network_module`` / ``ss_network_args["algo"]`` for each type.
KOHYA_NETWORK_MODULE = {
    "lora": "networks.lora",
    "locon": "networks.lora",
    "loha": "lycoris.kohya",
    "lokr": "lycoris.kohya",
    "dora": "lycoris.kohya",
}
LYCORIS_ALGO = {"loha": "loha", "lokr": "lokr", "dora": "lora"}


@dataclass
class NetworkSpec:
    """The user's network settings (see ``LoraDiffusionModule`` for each one's meaning)."""

    network_type: NetworkType = "lora"
    rank: int = 16
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lokr_factor: int = -1
    dora_axis: DoraAxis = "output"

    def check(self, key: str = "model") -> None:
        if self.network_type not in NETWORK_TYPES:
            raise LorafitError(f"{key}.network_type: {self.network_type!r} is not one of {', '.join(NETWORK_TYPES)}")
        if self.dora_axis not in ("output", "input"):
            raise LorafitError(f"{key}.dora_axis: {self.dora_axis!r} is not 'output' or 'input'")
        if self.dora_axis == "input" and self.network_type != "dora":
            raise LorafitError(
                f"{key}.dora_axis: 'input' applies to network type dora, not {self.network_type!r}; remove it "
                "or set the type to dora"
            )
        for name, value in (("rank", self.rank), ("conv_rank", self.conv_rank), *self.rank_pattern.items()):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LorafitError(f"{key}: rank {name!r} must be an integer >= 1, got {value!r}")
        for pattern in (*self.rank_pattern, *self.alpha_pattern):
            try:
                re.compile(pattern)
            except re.error as error:
                raise LorafitError(
                    f"{key}.rank_pattern/alpha_pattern: {pattern!r} is not a valid regex ({error})"
                ) from None

    def kohya_network_args(self) -> dict[str, str]:
        """``ss_network_args`` as kohya/LyCORIS write them (strings), for the file's metadata."""
        args: dict[str, str] = {}
        if self.network_type in LYCORIS_ALGO:
            args["algo"] = LYCORIS_ALGO[self.network_type]
        if self.network_type == "dora":
            args["dora_wd"] = "True"
            args["wd_on_output"] = str(self.dora_axis == "output")  # LyCORIS's name for the axis
        if self.network_type == "lokr":
            args["factor"] = str(self.lokr_factor)
        if self.conv_rank is not None:
            args["conv_dim"] = str(self.conv_rank)
            args["conv_alpha"] = str(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return args


def module_rank_alpha(spec: NetworkSpec, name: str, module: torch.nn.Module) -> tuple[int, float]:
    """(rank, alpha) of one module: pattern, else conv setting for k x k convs, else the defaults.

    Alpha left empty means alpha = that module's rank (scale 1), lorafit's convention.
    """
    spatial = is_spatial_conv(module)
    rank = next((r for p, r in spec.rank_pattern.items() if matches(p, name)), None)
    if rank is None:
        rank = spec.conv_rank if spatial and spec.conv_rank is not None else spec.rank
    alpha = next((float(a) for p, a in spec.alpha_pattern.items() if matches(p, name)), None)
    if alpha is None and spatial and spec.conv_rank is not None:
        alpha = spec.conv_alpha if spec.conv_alpha is not None else float(rank)
    if alpha is None:
        alpha = spec.alpha
    return int(rank), float(rank if alpha is None else alpha)


def network_config(spec: NetworkSpec, targets: dict[str, torch.nn.Module]):
    """The PEFT config that puts ``spec``'s network type on exactly ``targets`` with their ranks/alphas."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    spec.check()
    per_module = {name: module_rank_alpha(spec, name, module) for name, module in targets.items()}
    rank = Counter(r for r, _ in per_module.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in per_module.values()).most_common(1)[0][0]
    common = dict(
        r=rank,
        target_modules=sorted(targets),
        # Exact, escaped full names: PEFT matches these as regexes against the module names.
        rank_pattern={re.escape(n): r for n, (r, _) in per_module.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, (_, a) in per_module.items() if a != alpha},
    )
    if spec.network_type == "loha":
        return LoHaConfig(alpha=alpha, **common)
    if spec.network_type == "lokr":
        return LoKrConfig(alpha=alpha, decompose_factor=spec.lokr_factor, **common)
    # init_lora_weights=True: down Kaiming-uniform, up zeros, so training starts at the base model.
    # DoRA per input channel is a plain LoRA here; attach_network adds its magnitudes (input_dora.py).
    use_dora = spec.network_type == "dora" and spec.dora_axis == "output"
    return LoraConfig(lora_alpha=alpha, use_dora=use_dora, init_lora_weights=True, **common)
