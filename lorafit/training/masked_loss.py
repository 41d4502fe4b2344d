"""Masked loss: each latent position's loss weighted by the image's loss mask (docs/teaching-methods.md).

The batch carries ``loss_mask`` ([B, 1, H, W] in [0, 1], at the training image's pixels, cropped
and flipped with it; :mod:`lorafit.data.masks`). The loss lives on the latent grid, so the mask is
averaged down to it (``area`` interpolation: each latent position weighs by the share of its pixels
the mask covers, as kohya's ``apply_masked_loss`` does), then lifted to the floor:
``weight = floor + (1 - floor) * mask``. With ``normalize`` each sample's weights are divided by
their mean (OneTrainer's ``normalize_masked_area_loss``), so a small subject counts as much as a
large one. Everything stays on the device: no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_weights(
    mask: torch.Tensor | None, latent_size: tuple[int, int], floor: float, normalize: bool
) -> torch.Tensor | None:
    """Per-position loss weights [B, 1, h, w] for latents of ``latent_size`` (h, w); None without a mask
    or with ``floor`` 1 (every position counts fully)."""
    if mask is None or floor >= 1.0:
        return None
    weights = F.interpolate(mask.float(), size=tuple(latent_size), mode="area")
    weights = floor + (1.0 - floor) * weights
    if normalize:
        weights = weights / weights.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return weights
