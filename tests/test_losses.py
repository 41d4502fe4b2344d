"""Noise and loss options against formulas written out here, independently of lorafit/training/losses.py."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.training import losses

# SD1/SD2/SDXL's training schedule ("scaled_linear", 1000 steps), written out.
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, dim=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _snr(t: int) -> float:
    alpha_bar = float(ALPHAS_CUMPROD[t])
    return alpha_bar / (1 - alpha_bar)


def test_offset_noise_adds_a_per_channel_constant():
    noise = torch.randn(3, 4, 8, 8, generator=_gen(1))
    out = losses.offset_noise(noise, 0.1, _gen(7))
    expected_shift = 0.1 * torch.randn(3, 4, 1, 1, generator=_gen(7))
    torch.testing.assert_close(out, noise + expected_shift)
    assert losses.offset_noise(noise, 0.0, _gen(7)) is noise


def test_offset_noise_random_strength_scales_by_a_uniform_draw():
    noise = torch.zeros(2, 4, 4, 4)
    generator = _gen(3)
    strength = torch.rand(1, generator=generator).item() * 0.2  # kohya: rand(1) * noise_offset
    shift = torch.randn(2, 4, 1, 1, generator=generator)
    torch.testing.assert_close(
        losses.offset_noise(noise, 0.2, _gen(3), random_strength=True), (strength * shift).expand(2, 4, 4, 4)
    )
    # Statistically: the offset's spread is the offset strength times a standard normal.
    shifts = torch.stack([losses.offset_noise(torch.zeros(1, 4, 2, 2), 0.1, _gen(s))[0, :, 0, 0] for s in range(500)])
    assert 0.09 < float(shifts.std()) < 0.11


def test_pyramid_noise_matches_the_multires_formula():
    noise = torch.randn(2, 4, 16, 16, generator=_gen(1))
    iterations, discount = 3, 0.4
    generator, factors = _gen(5), _gen(5)
    expected = noise.clone()
    for i in range(iterations):  # kohya's pyramid_noise_like, the factor from a host generator of the same seed
        r = torch.rand(1, generator=factors).item() * 2 + 2
        h, w = max(1, int(16 / r**i)), max(1, int(16 / r**i))
        upsample = torch.nn.Upsample(size=(16, 16), mode="bilinear")
        expected = expected + upsample(torch.randn(2, 4, h, w, generator=generator)) * discount**i
        if h == 1 or w == 1:
            break
    expected = expected / expected.std()
    out = losses.pyramid_noise(noise, _gen(5), iterations, discount)
    torch.testing.assert_close(out, expected)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-5)
    assert losses.pyramid_noise(noise, _gen(5), 0, discount) is noise


def test_pyramid_noise_is_spatially_correlated():
    """Low-frequency content is the point: neighbouring pixels correlate, unlike white noise."""

    def neighbour_correlation(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    white = torch.randn(8, 4, 32, 32, generator=_gen(2))
    correlations = [
        neighbour_correlation(losses.pyramid_noise(white, _gen(seed), iterations=8, discount=0.8)) for seed in range(8)
    ]
    assert abs(neighbour_correlation(white)) < 0.05
    assert min(correlations) > 0.1 and sum(correlations) / len(correlations) > 0.2, correlations


def test_input_perturbation_adds_scaled_fresh_noise():
    noise = torch.randn(2, 4, 8, 8, generator=_gen(1))
    out = losses.perturbed_noise(noise, 0.1, _gen(9))
    torch.testing.assert_close(out, noise + 0.1 * torch.randn(2, 4, 8, 8, generator=_gen(9)))
    generator = _gen(9)
    strength = torch.rand(1, generator=generator).item() * 0.1
    torch.testing.assert_close(
        losses.perturbed_noise(noise, 0.1, _gen(9), random_strength=True),
        noise + strength * torch.randn(2, 4, 8, 8, generator=generator),
    )


def test_timesteps_stay_in_min_max_range():
    t = losses.sample_timesteps(4000, _gen(0), 200, 300)
    assert int(t.min()) == 200 and int(t.max()) == 299  # max is exclusive, as kohya's max_timestep


def test_signal_to_noise_ratio():
    timesteps = torch.tensor([0, 10, 500, 999])
    snr = losses.signal_to_noise(ALPHAS_CUMPROD.float(), timesteps)
    for value, t in zip(snr.tolist(), timesteps.tolist()):
        assert value == pytest.approx(_snr(t), rel=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weight(prediction_type):
    snr = torch.tensor([0.5, 5.0, 50.0])
    gamma = 5.0
    expected = {  # min(snr, gamma) / snr for epsilon, / (snr + 1) for v-prediction
        "epsilon": [1.0, 1.0, 0.1],
        "v_prediction": [0.5 / 1.5, 5 / 6, 5 / 51],
    }[prediction_type]
    assert losses.min_snr_weight(snr, gamma, prediction_type).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_weight(prediction_type):
    snr = torch.tensor([4.0, 0.25, 1.0e6])  # the last is capped at 1000, as kohya does
    expected = {
        "epsilon": [0.5, 2.0, 1 / math.sqrt(1000)],
        "v_prediction": [1 / 5, 1 / 1.25, 1 / 1001],
    }[prediction_type]
    assert losses.debiased_weight(snr, prediction_type).tolist() == pytest.approx(expected)


def test_prior_weights_mark_regularization_samples():
    is_reg = torch.tensor([True, False, True])
    assert losses.prior_weights(is_reg, 3, 0.25).tolist() == [0.25, 1.0, 0.25]
    assert losses.prior_weights(None, 2, 0.25).tolist() == [1.0, 1.0]


def test_huber_thresholds_per_schedule():
    t = torch.tensor([0, 250, 1000 - 1])
    c, scale = 0.1, 2.0
    assert losses.huber_threshold(t, "constant", c, scale, ALPHAS_CUMPROD, 1000).tolist() == pytest.approx([0.2] * 3)
    # exponential: exp(-a t) * scale with a = -ln(c) / T: scale at t=0, towards c * scale at t=T.
    exponential = losses.huber_threshold(t, "exponential", c, scale, ALPHAS_CUMPROD, 1000)
    assert exponential.tolist() == pytest.approx([scale * c ** (x / 1000) for x in t.tolist()], rel=1e-5)
    # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - alpha_bar) / alpha_bar); no scale.
    snr_schedule = losses.huber_threshold(t, "snr", c, scale, ALPHAS_CUMPROD, 1000)
    sigmas = [math.sqrt(1 / _snr(x)) for x in t.tolist()]
    assert snr_schedule.tolist() == pytest.approx([(1 - c) / (1 + s) ** 2 + c for s in sigmas], rel=1e-5)


def test_per_sample_losses():
    prediction = torch.tensor([[0.0, 1.0, 3.0, -2.0], [0.5, 0.5, 0.5, 0.5]]).view(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    diffs = [[0.0, 1.0, 3.0, -2.0], [0.5] * 4]
    c = torch.tensor([0.1, 0.5])

    def mean(values):
        return sum(values) / len(values)

    assert losses.per_sample_loss(prediction, target, "l2").tolist() == pytest.approx(
        [mean([d * d for d in r]) for r in diffs]
    )
    assert losses.per_sample_loss(prediction, target, "l1").tolist() == pytest.approx(
        [mean([abs(d) for d in r]) for r in diffs]
    )
    huber = [mean([2 * ci * (math.sqrt(d * d + ci * ci) - ci) for d in r]) for r, ci in zip(diffs, c.tolist())]
    assert losses.per_sample_loss(prediction, target, "huber", c).tolist() == pytest.approx(huber, rel=1e-5)
    smooth = [mean([2 * (math.sqrt(d * d + ci * ci) - ci) for d in r]) for r, ci in zip(diffs, c.tolist())]
    assert losses.per_sample_loss(prediction, target, "smooth_l1", c).tolist() == pytest.approx(smooth, rel=1e-5)
    # Pseudo-Huber behaves like L2 for small residuals and like L1 (times 2c) for large ones.
    small, large = torch.full((1, 1, 1, 1), 0.03), torch.full((1, 1, 1, 1), 100.0)
    one = torch.tensor([1.0])
    assert losses.per_sample_loss(small, torch.zeros_like(small), "huber", one).item() == pytest.approx(9e-4, rel=1e-2)
    assert losses.per_sample_loss(large, torch.zeros_like(large), "huber", one).item() == pytest.approx(198.0, rel=1e-3)


def test_weighted_mean_multiplies_every_weight_per_sample():
    per_sample = torch.tensor([1.0, 2.0, 4.0])
    out = losses.weighted_mean(per_sample, torch.tensor([1.0, 0.5, 0.25]), None, torch.tensor([2.0, 2.0, 1.0]))
    assert out.item() == pytest.approx((1 * 1 * 2 + 2 * 0.5 * 2 + 4 * 0.25 * 1) / 3)
