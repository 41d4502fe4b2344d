"""The toolbox's shared maths: SVD of a LoRA product, kohya's rank rules, the streamed .safetensors writer."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights
from lorafit.networks.toolbox.low_rank import RankRule, kept, lora_shapes, svd_of_matrix, svd_of_product
from lorafit.networks.toolbox.merge_networks import concatenated
from lorafit.networks.toolbox.network_file import Network
from lorafit.networks.toolbox.safetensors_stream import Planned, eager, write_streamed


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_svd_of_a_lora_product_is_the_dense_svd_without_the_dense_matrix():
    up, down = _random(96, 6, seed=1), _random(6, 40, seed=2)
    factored = svd_of_product(up, down)
    dense = svd_of_matrix(up @ down)
    assert torch.allclose(factored.s, dense.s[:6], rtol=1e-5)
    assert float(dense.s[6:].abs().max()) < 1e-4 * float(dense.s[0])  # the product has rank 6
    for rank in (6, 3):
        got_up, got_down = factored.factors(rank)
        want_up, want_down = dense.factors(rank)
        assert torch.allclose(got_up @ got_down, want_up @ want_down, atol=1e-4)
    # Cut to the full rank, the product comes back: resize to the full rank is lossless.
    full_up, full_down = factored.factors(6)
    assert torch.allclose(full_up @ full_down, up @ down, atol=1e-4)


@pytest.mark.parametrize(
    "rule, keep",
    [
        (RankRule(8), 4),  # a fixed rank above what the update has keeps all 4
        (RankRule(2), 2),
        (RankRule(None, "sv_ratio", 4.0), 3),  # 8 / 2 = 4 <= 4, 8 / 1 = 8 > 4
        (RankRule(None, "sv_ratio", 3.9), 2),
        (RankRule(None, "sv_fro", 0.95), 2),  # sqrt(80/85) = 0.970
        (RankRule(None, "sv_fro", 0.99), 3),  # sqrt(84/85) = 0.994
        (RankRule(None, "sv_cumulative", 0.8), 2),  # 12/15 = 0.8 exactly: reached
        (RankRule(None, "sv_cumulative", 0.81), 3),
        (RankRule(2, "sv_fro", 0.99), 2),  # --rank caps a dynamic rule
    ],
)
def test_rank_rules_keep_the_fewest_directions_that_meet_kohyas_targets(rule, keep):
    singular_values = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert rule.choose(singular_values) == keep
    report = kept(singular_values, keep, 4)
    assert report.fro == pytest.approx((singular_values[:keep].pow(2).sum() / 85).sqrt().item())
    assert report.sum == pytest.approx(singular_values[:keep].sum().item() / 15)
    assert report.error == pytest.approx((1 - report.fro**2) ** 0.5)


def test_a_zero_update_keeps_one_zero_direction():
    assert RankRule(None, "sv_fro", 0.9).choose(torch.zeros(4)) == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rank=None), "give --rank N, or a dynamic rule"),
        (dict(rank=4, sv_fro=0.9, sv_ratio=2.0), "choose one dynamic rule"),
        (dict(rank=None, sv_fro=1.5), r"--sv_fro must be in \(0, 1\]"),
        (dict(rank=None, sv_ratio=0.5), "--sv_ratio must be >= 1"),
        (dict(rank=0), "--rank must be >= 1"),
    ],
)
def test_bad_rank_options_are_one_line_errors(options, message):
    with pytest.raises(LorafitError, match=message) as error:
        RankRule.from_options(**options)
    assert "\n" not in str(error.value)


def test_conv_factors_take_the_kernel_of_the_weight():
    up, down = lora_shapes(_random(16, 3), _random(3, 8 * 9), torch.Size([16, 8, 3, 3]))
    assert up.shape == (16, 3, 1, 1) and down.shape == (3, 8, 3, 3)


def test_concatenation_is_the_exact_weighted_sum_at_any_alphas():
    a = LoraModuleWeights(_random(4, 12, seed=3), _random(10, 4, seed=4), alpha=1.0)
    b = LoraModuleWeights(_random(2, 12, seed=5), _random(10, 2, seed=6), alpha=8.0)
    net = Network("x.safetensors", "kohya", {"m": a})
    merged = concatenated("m", [(0.7, a, net), (-0.5, b, net)])
    assert merged.rank == 6
    assert torch.allclose(merged.delta_weight(), 0.7 * a.delta_weight() - 0.5 * b.delta_weight(), atol=1e-5)


def test_streamed_file_reads_back_as_written_in_every_dtype(tmp_path):
    tensors = {
        "b.f32": _random(3, 5),
        "a.f16": _random(7, seed=1).half(),
        "c.bf16": _random(2, 2, 2, seed=2).bfloat16(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(4.0),
        "f.bool": torch.tensor([True, False, True]),
    }
    made = []

    def planned(key, tensor):
        return Planned(tuple(tensor.shape), tensor.dtype, lambda: made.append(key) or tensor)

    path = write_streamed(tmp_path / "x.safetensors", {k: planned(k, t) for k, t in tensors.items()}, {"k": "v"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert made == sorted(tensors)  # made one at a time, in the order they are written
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
    cast = write_streamed(tmp_path / "y.safetensors", {"x": eager(_random(2, 3), torch.float16)})
    assert load_file(str(cast))["x"].dtype == torch.float16


def test_a_tensor_that_breaks_its_plan_leaves_no_file(tmp_path):
    plan = {"x": Planned((2, 3), torch.float32, lambda: torch.zeros(3, 2))}
    with pytest.raises(LorafitError, match="came out"):
        write_streamed(tmp_path / "x.safetensors", plan)
    assert list(tmp_path.iterdir()) == []
