"""The toy-world benchmark's verdict on the selection metrics (lorafit/toyworld/benchmark.py)."""

from __future__ import annotations

import pytest

from lorafit.toyworld.benchmark import Cell, agreement


def _cell(epoch, strength, star, in_world, clip_fidelity, clip_flexibility, kid):
    return Cell(epoch, strength, star, 1.0, in_world, 0.0, clip_fidelity, clip_flexibility, kid, 10 * kid)


def test_agreement_ranks_the_metrics_against_the_judge_and_compares_the_suggested_epochs():
    base = _cell(0, 0.0, 0.0, 1.0, 0.20, 0.60, 4.0)  # the base model's row is not a LoRA cell
    cells = [
        base,
        _cell(1, 0.5, 0.00, 1.00, 0.25, 0.59, 3.0),
        _cell(1, 1.0, 0.10, 0.99, 0.30, 0.58, 2.0),
        _cell(2, 0.5, 0.05, 1.00, 0.27, 0.59, 2.5),
        _cell(2, 1.0, 0.60, 0.97, 0.40, 0.575, 0.5),
        _cell(3, 0.5, 0.08, 1.00, 0.28, 0.60, 2.2),
        # epoch 3 at strength 1: the judge sees more stars and a better trade-off; the CLIP prefers epoch 2
        _cell(3, 1.0, 0.80, 0.98, 0.39, 0.57, 0.3),
    ]
    result = agreement(cells, 1.0, [1, 2, 3])
    assert result.cells == 6
    assert result.kid_spearman == pytest.approx(1.0)  # lower KID <-> more stars, in the same order
    assert 0.8 < result.fidelity_spearman < 1.0  # one swapped pair
    assert result.flexibility_spearman > 0.5
    assert (result.suggested, result.judge_best, result.saved_epochs_apart) == (2, 3, 1)
    assert result.reason.startswith("epoch 2 has the best balance")
