"""The low-rank maths every toolbox verb shares: SVD of an update, the rank rules, the energy kept.

An update ``ΔW`` (``[out, in]``, or ``[out, in, kh, kw]`` for a conv, handled as ``[out, in*kh*kw]``)
is cut to rank ``k`` by its SVD, ``ΔW ≈ U_k S_k V_kᵀ``: the best rank-``k`` approximation in
Frobenius norm (Eckart-Young), so nothing cheaper can be closer. The rank comes from a
:class:`RankRule`, with kohya's ``resize_lora.py`` meanings of the dynamic rules:

- ``sv_ratio r``: keep the singular values within a factor ``r`` of the largest (``σ_i ≥ σ_0 / r``);
- ``sv_fro f``: keep the fewest that hold a fraction ``f`` of the Frobenius norm (``√(Σ_kept σ²/Σσ²) ≥ f``);
- ``sv_cumulative c``: keep the fewest whose sum is a fraction ``c`` of the sum of all.

kohya's script keeps one singular value more than its target needs (its index is off by one, then
clamped); lorafit keeps the smallest rank that meets the target, and says per module what it kept.

A LoRA's update is a product ``up @ down`` of rank ``r``; its SVD comes from two thin QR
factorisations and the SVD of an ``r x r`` core, ``O((out + in) r²)`` instead of ``O(out · in ·
min(out, in))``, and exact: resizing SDXL needs no dense matrix at all. Work is done in float64
(cheap at these sizes) so that "resize to the full rank" gives the input back to float32 precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lorafit.errors import LorafitError

Method = Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
_ZERO = 1e-12  # a largest singular value below this is a zero update (kohya's MIN_SV, relative to float64)


@dataclass(frozen=True)
class RankRule:
    """How many singular directions to keep: a fixed ``rank``, or a dynamic ``method`` capped at ``rank``."""

    rank: int | None = None
    method: Method = "fixed"
    value: float | None = None

    def __post_init__(self):
        if self.rank is not None and self.rank < 1:
            raise LorafitError(f"--rank must be >= 1, got {self.rank}")
        if self.method == "fixed" and self.rank is None:
            raise LorafitError("give --rank N, or a dynamic rule (--sv_ratio, --sv_fro or --sv_cumulative)")
        if self.method == "sv_ratio" and (self.value is None or self.value < 1):
            raise LorafitError(f"--sv_ratio must be >= 1 (largest / smallest kept singular value), got {self.value}")
        if self.method in ("sv_fro", "sv_cumulative") and (self.value is None or not 0 < self.value <= 1):
            raise LorafitError(f"--{self.method} must be in (0, 1] (the fraction to keep), got {self.value}")

    @classmethod
    def from_options(
        cls,
        rank: int | None,
        sv_ratio: float | None = None,
        sv_fro: float | None = None,
        sv_cumulative: float | None = None,
    ) -> RankRule:
        """The rule of a verb's ``--rank``/``--sv_*`` options (at most one dynamic rule)."""
        given = {k: v for k, v in (("sv_ratio", sv_ratio), ("sv_fro", sv_fro), ("sv_cumulative", sv_cumulative)) if v}
        if len(given) > 1:
            raise LorafitError(f"choose one dynamic rule, not {' and '.join('--' + k for k in given)}")
        if given:
            ((method, value),) = given.items()
            return cls(rank, method, float(value))
        return cls(rank)

    def describe(self) -> str:
        if self.method == "fixed":
            return f"rank {self.rank}"
        cap = f", at most rank {self.rank}" if self.rank else ""
        return f"{self.method} {self.value:g}{cap}"

    def choose(self, singular_values: torch.Tensor, cap: int | None = None) -> int:
        """The rank to keep for these singular values (descending), at least 1, at most ``cap``."""
        s = singular_values.double()
        limit = min(x for x in (self.rank, cap, len(s)) if x is not None)
        if len(s) == 0 or float(s[0]) <= _ZERO:
            return 1  # a zero update: keep one (zero) direction so the module stays in the file
        if self.method == "fixed":
            return max(1, limit)
        if self.method == "sv_ratio":
            keep = int((s >= s[0] / self.value).sum())
        else:
            weights = s.pow(2) if self.method == "sv_fro" else s
            target = self.value**2 if self.method == "sv_fro" else self.value
            fractions = torch.cumsum(weights, 0) / weights.sum()
            # The first prefix that reaches the target (a hair of slack for float sums at 1.0).
            keep = int((fractions < target - 1e-9).sum()) + 1
        return max(1, min(keep, limit))


def numerical_rank(singular_values: torch.Tensor, tolerance: float = 1e-6) -> int:
    """How many singular values are above ``tolerance`` of the largest: the rank a dense update has,
    beyond which more directions would hold only rounding noise."""
    if len(singular_values) == 0 or float(singular_values[0]) <= _ZERO:
        return 0
    return int((singular_values > singular_values[0] * tolerance).sum())


@dataclass(frozen=True)
class Kept:
    """What a rank cut kept of one module's update (kohya's verbose resize report, plus the error)."""

    rank_before: int
    rank_after: int
    fro: float  # √(Σ_kept σ² / Σ σ²): the share of the Frobenius norm kept
    sum: float  # Σ_kept σ / Σ σ
    max_ratio: float  # σ_0 / σ_last kept

    @property
    def error(self) -> float:
        """Relative Frobenius error of the cut update, ``‖ΔW - ΔW_k‖ / ‖ΔW‖``."""
        return math.sqrt(max(0.0, 1.0 - self.fro**2))


def kept(singular_values: torch.Tensor, rank: int, rank_before: int) -> Kept:
    s = singular_values.double()
    total2, total = float(s.pow(2).sum()), float(s.sum())
    if total <= _ZERO:
        return Kept(rank_before, rank, 1.0, 1.0, 1.0)
    last = float(s[min(rank, len(s)) - 1])
    return Kept(
        rank_before=rank_before,
        rank_after=rank,
        fro=math.sqrt(float(s[:rank].pow(2).sum()) / total2),
        sum=float(s[:rank].sum()) / total,
        max_ratio=float(s[0]) / last if last > 0 else math.inf,
    )


@dataclass
class Svd:
    """A thin SVD ``U diag(S) Vh`` of a 2-D update (conv kernels flattened into the columns)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the best rank-``rank`` approximation, float32; √S on each side keeps both
        factors in the same range (kohya puts all of S into ``up``; either product is the same)."""
        root = self.s[:rank].sqrt()
        up = self.u[:, :rank] * root
        down = root[:, None] * self.vh[:rank]
        if rank > len(self.s):  # asked for more directions than the update has: zero ones
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - len(self.s))], dim=1)
            down = torch.cat([down, down.new_zeros(rank - len(self.s), down.shape[1])])
        return up.float().contiguous(), down.float().contiguous()


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> Svd:
    """SVD of ``up @ down`` (``up`` ``[out, r]``, ``down`` ``[r, n]``) without forming the product."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return Svd(q_up @ u, s, vh @ q_down.T)


def svd_of_matrix(matrix: torch.Tensor, device: str | torch.device = "cpu") -> Svd:
    """SVD of a dense 2-D update (extract, LoHa/LoKr deltas), on ``device`` (``cuda`` is much faster)."""
    u, s, vh = torch.linalg.svd(matrix.to(device, torch.float32), full_matrices=False)
    return Svd(u.double().cpu(), s.double().cpu(), vh.double().cpu())


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """``[out, in(, kh, kw)]`` -> ``[out, in*kh*kw]``: a conv update as the matrix its LoRA factors."""
    return tensor.reshape(tensor.shape[0], -1)


def lora_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape: torch.Size | tuple) -> tuple:
    """Matrix factors in a LoRA module's layout for a weight of ``weight_shape``: Linear ``[out, r]``
    / ``[r, in]``; conv ``[out, r, 1, 1]`` / ``[r, in, kh, kw]`` (kohya's LoCon, PEFT's conv LoRA)."""
    if len(weight_shape) == 4:
        rank = down.shape[0]
        return up.reshape(up.shape[0], rank, 1, 1), down.reshape(rank, *weight_shape[1:])
    return up, down
