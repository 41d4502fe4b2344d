"""Join LoRAs of several modules into one LoRA of their fused module, and split one back, exactly.

Flux's kohya/ComfyUI layout (BFL's model) has one Linear where diffusers has several: the image
stream's ``to_q``/``to_k``/``to_v`` are one ``qkv`` whose output rows stack theirs. A LoRA on each
part, ``ΔW_i = s_i * U_i @ D_i`` (``s_i = alpha_i / rank_i``), is one LoRA on the fused module with

    down = [D_1; D_2; ...]            (rank R = Σ rank_i)
    up   = block-diag(c_1 U_1, c_2 U_2, ...)   with c_i = s_i / s and alpha = s * R

so ``s * up @ down`` stacks every ``ΔW_i``: kohya's own ``split_qkv`` networks save exactly this
block-diagonal form, and diffusers' converter (``_convert_kohya_flux_lora_to_diffusers``) and
ComfyUI read it back. ``s`` is the first part's scale, so equal scales (the usual case) change no
weight. A part without a LoRA contributes zero rows (padded to the common rank when the others
agree, which keeps diffusers' "sparse" reading of the file).

Splitting takes each part's rows of ``up`` and only the columns (rank directions) they use: a
joined module splits back into its parts exactly; a LoRA trained on the fused module (dense ``up``)
splits into parts that share its ``down``, each exact. DoRA's magnitudes are per output row, so
they stack and split with the rows. LoHa/LoKr cannot be fused this way (their update is not a
low-rank product): they are written under per-module names instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafit.errors import LorafitError
from lorafit.families.family import KohyaModule
from lorafit.networks.lora_weights import LoraModuleWeights


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]])


def join(
    module: KohyaModule,
    parts: list[LoraModuleWeights | None],
    where: str,
    base_weight: Callable[[str], torch.Tensor] | None = None,
) -> LoraModuleWeights:
    """One LoRA of the fused ``module`` from its parts' LoRAs (None: a part without one).

    DoRA needs a magnitude for every output row: a part without DoRA gets its base weight's row
    norms (``base_weight(module name)``), which with a zero update leaves those rows unchanged.
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise LorafitError(f"{where}: no part of {module.stem} has a LoRA")
    if not module.fused:
        (only,) = present
        if not module.swap_halves:
            return only
        scale = only.dora_scale if only.dora_axis != 0 else _swap_halves(only.dora_scale)
        return LoraModuleWeights(only.down, _swap_halves(only.up), only.alpha, scale)
    dora = [p.dora_scale is not None for p in present]
    if any(dora) and not all(dora):
        raise LorafitError(f"{where}: {module.stem} mixes DoRA and plain LoRA parts; they cannot be written fused")
    if any(dora) and len(present) < len(parts) and base_weight is None:
        raise LorafitError(
            f"{where}: DoRA on some parts of {module.stem} only needs the base model's weights to be written "
            "fused (export from training or give the base model)"
        )
    scale = present[0].alpha / present[0].rank
    ranks = {p.rank for p in present}
    pad = ranks.pop() if len(ranks) == 1 else 1
    reference = present[0].down
    downs, ups = [], []
    for (_, rows), part in zip(module.parts, parts):
        if part is None:  # zero rows: this output slice is unchanged
            downs.append(torch.zeros(pad, reference.shape[1], dtype=reference.dtype))
            ups.append(torch.zeros(rows, pad, dtype=reference.dtype))
        else:
            downs.append(part.down)
            ups.append(part.up * (part.alpha / part.rank / scale))
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(u.shape[0] for u in ups), rank, dtype=reference.dtype)
    row = col = 0
    for u in ups:
        up[row : row + u.shape[0], col : col + u.shape[1]] = u
        row, col = row + u.shape[0], col + u.shape[1]
    dora_scale = None
    if all(dora):
        scales = []
        for (name, _), part in zip(module.parts, parts):
            if part is not None:
                scales.append(part.dora_scale)
            else:  # no update on these rows: their magnitude is the base weight's row norm
                norm = base_weight(name).float().flatten(1).norm(dim=1)
                scales.append(norm.reshape(-1, 1).to(reference.dtype))
        dora_scale = torch.cat(scales)
    return LoraModuleWeights(torch.cat(downs), up, scale * rank, dora_scale)


def split(module: KohyaModule, weights: LoraModuleWeights, where: str) -> list[LoraModuleWeights]:
    """The parts' LoRAs of one LoRA on the fused ``module`` (every part gets one)."""
    rows = [r for _, r in module.parts]
    if weights.dora_axis == 1 and module.fused:
        # The fused weight's column norms mix every part's rows: no per-part DoRA reproduces them.
        raise LorafitError(f"{where}: DoRA per input channel on the fused module {module.stem} is not supported")
    if weights.up.shape[0] != sum(rows):
        raise LorafitError(
            f"{where}: {module.stem} has {weights.up.shape[0]} output rows, but this model's module has "
            f"{sum(rows)} (a LoRA for another size of the model?)"
        )
    if not module.fused:
        if not module.swap_halves:
            return [weights]
        # Output-channel magnitudes follow their rows; input-channel ones do not depend on the row order.
        scale = weights.dora_scale if weights.dora_axis != 0 else _swap_halves(weights.dora_scale)
        return [LoraModuleWeights(weights.down, _swap_halves(weights.up), weights.alpha, scale)]
    s = weights.alpha / weights.rank
    out, start = [], 0
    for k, count in enumerate(rows):
        up = weights.up[start : start + count]
        used = up.abs().sum(dim=0) != 0
        if not bool(used.any()):  # an untrained (all-zero) part: its block, or every direction
            block = weights.rank // len(rows)
            used = torch.zeros_like(used)
            if weights.rank % len(rows) == 0:
                used[k * block : (k + 1) * block] = True
            else:
                used[:] = True
        columns = used.nonzero().flatten()
        dora = None if weights.dora_scale is None else weights.dora_scale[start : start + count]
        out.append(LoraModuleWeights(weights.down[columns], up[:, columns], s * len(columns), dora))
        start += count
    return out
