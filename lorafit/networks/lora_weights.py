"""One in-memory form of a LoRA, between the live PEFT model and every file format we read or write.

A ``LoraWeights`` maps component (``unet``, ``text_encoder``, ``text_encoder_2`` — diffusers'
names) to module name (as ``named_modules()`` of that component spells it) to the module's
``down``/``up`` matrices and its true ``alpha``. Formats (kohya, diffusers/PEFT) only rename keys
and pack metadata around this, so conversions are exact by construction.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from lorafit.networks.adapters import adapter_state_dict, module_alphas

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModuleWeights:
    """``W' = W + alpha / rank * up @ down`` (rank = ``down.shape[0]``)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraWeights = dict[str, dict[str, LoraModuleWeights]]


def from_peft_model(components: dict[str, torch.nn.Module]) -> LoraWeights:
    """Read the adapter of each live component (detached CPU copies, float32)."""
    result: LoraWeights = {}
    for component, model in components.items():
        state = adapter_state_dict(model)
        alphas = module_alphas(model)
        modules = {}
        for name, (_, alpha) in alphas.items():
            modules[name] = LoraModuleWeights(
                down=state[f"{name}.lora_A.weight"].detach().to("cpu", torch.float32).clone(),
                up=state[f"{name}.lora_B.weight"].detach().to("cpu", torch.float32).clone(),
                alpha=alpha,
            )
        if modules:
            result[component] = modules
    return result


def cast(weights: LoraWeights, dtype: torch.dtype) -> LoraWeights:
    """A copy with every matrix in ``dtype`` (alphas are plain floats and stay exact)."""
    return {
        component: {name: LoraModuleWeights(m.down.to(dtype), m.up.to(dtype), m.alpha) for name, m in modules.items()}
        for component, modules in weights.items()
    }


def peft_config_for(modules: dict[str, LoraModuleWeights]) -> dict:
    """A LoraConfig dict reproducing every module's rank and alpha.

    The most common rank/alpha become ``r``/``lora_alpha``; any other module gets an exact
    (escaped, full-name) entry in ``rank_pattern``/``alpha_pattern``, which PEFT matches as regexes.
    """
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
        "use_dora": False,
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


def delta_weight(module: LoraModuleWeights) -> torch.Tensor:
    """The full update ``alpha / rank * up @ down`` (reshaped for convolutions), for tests and merges."""
    scale = module.alpha / module.rank
    down, up = module.down.float(), module.up.float()
    if down.dim() == 4:
        if down.shape[2:] == (1, 1):
            return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
        return scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return scale * up @ down
