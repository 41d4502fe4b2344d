"""LoHa and LoKr module weights, under LyCORIS's part names and with its reading of ``alpha``.

The update each kind makes is defined the way A1111 (``extensions-builtin/Lora/network_lo*.py``),
ComfyUI (``comfy/weight_adapter/lo*.py``) and LyCORIS itself compute it from a file, because a
file is only useful if those apps read it as we trained it:

- LoHa: ``dW = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product), rank =
  ``w1_b.shape[0]``; convolutions keep ``w*_b`` flat as ``[rank, in * kh * kw]``.
- LoKr: ``dW = scale * kron(w1, w2)`` with ``w1 = w1_a @ w1_b`` and ``w2 = w2_a @ w2_b`` when
  stored factored. ``scale = alpha / rank`` where rank is ``w2_b.shape[0]`` (else ``w1_b``'s);
  when both ``w1`` and ``w2`` are full matrices there is no rank and the apps use scale 1,
  whatever ``alpha`` says. PEFT always scales by ``alpha / r``, so the exporter folds that
  factor into ``w1`` for such modules (see ``peft_layers``).

A missing ``alpha`` means scale 1 for both kinds, as those apps read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch


@dataclass
class LohaModuleWeights:
    """LoHa (LyCORIS ``hada_*``): a Hadamard product of two low-rank matrices."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float

    kind: ClassVar[str] = "loha"
    REQUIRED: ClassVar[frozenset] = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    OPTIONAL: ClassVar[frozenset] = frozenset()  # hada_t1/t2 (Tucker convs) are not supported
    PREFIXES: ClassVar[tuple] = ("hada_",)

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def parts(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], alpha: float | None) -> LohaModuleWeights:
        rank = float(parts["hada_w1_b"].shape[0])
        return cls(
            parts["hada_w1_a"],
            parts["hada_w1_b"],
            parts["hada_w2_a"],
            parts["hada_w2_b"],
            rank if alpha is None else alpha,
        )

    def to(self, dtype: torch.dtype) -> LohaModuleWeights:
        return replace(self, **{name: t.to(dtype) for name, t in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "alpha"}

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        w1 = self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2_a.float() @ self.w2_b.float()
        delta = self.alpha / self.rank * w1 * w2
        return delta if base_weight is None else delta.reshape(base_weight.shape)


@dataclass
class LokrModuleWeights:
    """LoKr (LyCORIS ``lokr_*``): a Kronecker product of two (optionally low-rank) factors."""

    alpha: float
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None

    kind: ClassVar[str] = "lokr"
    REQUIRED: ClassVar[frozenset] = frozenset()  # either factor may be full or factored; checked below
    OPTIONAL: ClassVar[frozenset] = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    )
    PREFIXES: ClassVar[tuple] = ("lokr_",)  # lokr_t2 (Tucker convs) is not supported

    def __post_init__(self):
        for factor in ("w1", "w2"):
            full = getattr(self, factor) is not None
            factored = (getattr(self, f"{factor}_a") is not None, getattr(self, f"{factor}_b") is not None)
            if full == any(factored) or (any(factored) and not all(factored)):
                from lorafit.errors import LorafitError

                raise LorafitError(f"LoKr module needs lokr_{factor} or both lokr_{factor}_a and lokr_{factor}_b")

    @property
    def rank(self) -> int | None:
        """The rank that divides alpha, or None when both factors are full (scale 1)."""
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def parts(self) -> dict[str, torch.Tensor]:
        return {f"lokr_{name}": tensor for name, tensor in self._tensors().items()}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], alpha: float | None) -> LokrModuleWeights:
        tensors = {name.removeprefix("lokr_"): t for name, t in parts.items() if name.startswith("lokr_")}
        module = cls(alpha=1.0, **tensors)
        # No alpha: scale 1, i.e. alpha = rank; with both factors full alpha is not read at all.
        module.alpha = float(module.rank or 1) if alpha is None else alpha
        return module

    def to(self, dtype: torch.dtype) -> LokrModuleWeights:
        return replace(self, **{name: t.to(dtype) for name, t in self._tensors().items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "alpha" and getattr(self, f.name) is not None
        }

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` as full matrices (float32); ``w2`` may be 4-D for convolutions."""
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2.float() if self.w2 is not None else self.w2_a.float() @ self.w2_b.float()
        return w1, w2

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = self.scale * torch.kron(w1, w2)
        return delta if base_weight is None else delta.reshape(base_weight.shape)
