"""The recipe inside LoraDiffusionModule: targets and weights per prediction type, noise options,
regularization weighting, memory knobs and dtypes."""

from __future__ import annotations

import pytest
import torch
from training import tiny_batch, train

from lorafit.errors import LorafitError
from lorafit.training.module import LoraDiffusionModule

# The tiny models' schedule (as SD's): scaled_linear betas 0.00085..0.012 over 1000 steps.
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


def _module(model_dir: str, **kwargs) -> LoraDiffusionModule:
    module = LoraDiffusionModule(model=model_dir, rank=4, **kwargs)
    module.configure_model()
    return module


def _batch(data_dir: str, size: int = 2) -> dict:
    return tiny_batch(data_dir, size)


@pytest.mark.parametrize("family, prediction_type", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_target_and_min_snr_weighting_per_prediction_type(family, prediction_type, tiny_models):
    module = _module(tiny_models[family], min_snr_gamma=5.0)
    assert module.base.prediction_type == prediction_type
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([5, 400, 900])
    alpha_bar = ALPHAS_CUMPROD[timesteps].float().view(-1, 1, 1, 1)
    expected_target = (
        noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    )
    target = module.objective.target(latents, noise, timesteps)
    torch.testing.assert_close(target, expected_target, rtol=1e-4, atol=1e-5)

    prediction = target + torch.randn(target.shape, generator=generator)
    snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    got = module.objective.loss(prediction, target, timesteps)
    assert got.item() == pytest.approx((per_sample * weight).mean().item(), rel=1e-5)
    # The weighting matters: at t=5 the SNR is far above gamma, so the plain mean differs.
    assert got.item() != pytest.approx(per_sample.mean().item(), rel=1e-2)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_debiased_estimation_per_prediction_type(family, tiny_models):
    module = _module(tiny_models[family], debiased_estimation_loss=True)
    prediction, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    timesteps = torch.tensor([100, 800])
    snr = ALPHAS_CUMPROD[timesteps] / (1 - ALPHAS_CUMPROD[timesteps])
    weight = 1 / snr.sqrt() if family == "sd1" else 1 / (snr + 1)
    assert module.objective.loss(prediction, target, timesteps).item() == pytest.approx(weight.mean().item(), rel=1e-4)


def test_zero_terminal_snr_rescales_the_schedule(tiny_models):
    module = _module(tiny_models["sd2"], zero_terminal_snr=True)
    # Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last is 0, rescale so the first is unchanged.
    root = ALPHAS_CUMPROD.sqrt()
    rescaled = (root - root[-1]) * root[0] / (root[0] - root[-1])
    torch.testing.assert_close(
        module.objective.noise_scheduler.alphas_cumprod.double(), rescaled**2, rtol=1e-4, atol=1e-6
    )
    assert module.objective.noise_scheduler.alphas_cumprod[-1] == 0
    # min-SNR on v-prediction stays finite at zero SNR: weight min(0, gamma) / (0 + 1) = 0.
    module = _module(tiny_models["sd2"], zero_terminal_snr=True, min_snr_gamma=5.0)
    loss = module.objective.loss(torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([999]))
    assert loss.item() == 0.0
    with pytest.raises(LorafitError, match="zero_terminal_snr needs a v-prediction model"):
        _module(tiny_models["sd1"], zero_terminal_snr=True)


def test_prior_loss_weight_scales_regularization_samples(tiny_models, demo_data):
    module = _module(tiny_models["sd1"], prior_loss_weight=0.25)
    batch = _batch(demo_data)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss(is_reg=None):
        marked = batch if is_reg is None else {**batch, "is_reg": torch.tensor(is_reg)}
        with torch.no_grad():  # same generator seed and batch shape: same latents for every call
            return module.denoising_loss(
                marked, torch.Generator().manual_seed(0), timesteps=torch.tensor([300, 600]), noise=noise
            ).item()

    plain = loss()  # (l0 + l1) / 2; absent is_reg = no regularization samples
    assert loss([False, False]) == pytest.approx(plain)
    assert loss([True, True]) == pytest.approx(0.25 * plain, rel=1e-5)
    first, second = loss([True, False]), loss([False, True])  # (0.25 l0 + l1) / 2 and (l0 + 0.25 l1) / 2
    assert first + second == pytest.approx(1.25 * plain, rel=1e-5)
    assert first != pytest.approx(second, rel=1e-3), "weights apply per sample, to the marked one"


def test_noise_options_change_the_model_input_the_way_kohya_does(tiny_models):
    base = _module(tiny_models["sd1"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def noised(module, seed=3):  # (noise, noisy input, timesteps); SD1 is epsilon: the target is the noise
        draw = module.objective.draw(latents, torch.Generator().manual_seed(seed))
        return draw.target, draw.noisy, draw.timesteps

    plain_noise, plain_noisy, plain_t = noised(base)
    offset = _module(tiny_models["sd1"], noise_offset=0.1)
    noise, noisy, t = noised(offset)
    shift = noise - plain_noise
    assert torch.equal(t, plain_t)
    assert shift.abs().max() > 0 and torch.allclose(shift, shift.mean(dim=(2, 3), keepdim=True), atol=1e-6)

    perturbed = _module(tiny_models["sd1"], ip_noise_gamma=0.1)
    noise, noisy, t = noised(perturbed)
    # The target noise is untouched; only the UNet's input carries the extra noise, scaled by sqrt(1 - alpha_bar).
    assert torch.equal(noise, plain_noise)
    extra = (noisy - plain_noisy) / (1 - ALPHAS_CUMPROD[t].float()).sqrt().view(-1, 1, 1, 1)
    assert 0.05 < float(extra.std()) < 0.15

    window = _module(tiny_models["sd1"], min_timestep=700, max_timestep=720)
    timesteps = torch.cat([noised(window, seed)[2] for seed in range(50)])
    assert int(timesteps.min()) >= 700 and int(timesteps.max()) < 720

    pyramid = _module(tiny_models["sd1"], multires_noise_iterations=6, multires_noise_discount=0.3)
    noise, _, _ = noised(pyramid)
    assert float(noise.std()) == pytest.approx(1.0, abs=1e-5) and not torch.allclose(noise, plain_noise)


@pytest.mark.parametrize("loss_type", ["l1", "huber", "smooth_l1"])
def test_loss_types_reach_the_training_loss(loss_type, tiny_models):
    module = _module(tiny_models["sd1"], loss_type=loss_type, huber_schedule="constant", huber_c=0.5)
    prediction, target = torch.full((1, 4, 8, 8), 3.0), torch.zeros(1, 4, 8, 8)
    expected = {"l1": 3.0, "huber": 2 * 0.5 * ((9 + 0.25) ** 0.5 - 0.5), "smooth_l1": 2 * ((9 + 0.25) ** 0.5 - 0.5)}
    assert module.objective.loss(prediction, target, torch.tensor([500])).item() == pytest.approx(expected[loss_type])


def _lora_grads(module, batch) -> dict[str, torch.Tensor]:
    module.zero_grad()
    loss = module.denoising_loss(
        batch,
        torch.Generator().manual_seed(0),
        timesteps=torch.tensor([200, 700]),
        noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
    )
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad and p.grad is not None}


def test_gradient_checkpointing_recomputes_and_keeps_gradients(tiny_models, demo_data):
    batch = _batch(demo_data)
    kwargs = {"train_text_encoder": True, "learning_rate": 1e-3}
    plain = _module(tiny_models["sdxl"], **kwargs)
    checkpointed = _module(tiny_models["sdxl"], gradient_checkpointing=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    # Make the LoRA "up" weights nonzero so every LoRA weight gets a gradient.
    for module in (plain, checkpointed):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.full_like(p, 0.01))
    # Count calls of an attention (LoRA'd) inside a checkpointed block/layer: the backward pass
    # recomputes it. (Not a block's last op: torch stops recomputing once the needed tensors exist.)
    calls = {"unet": 0, "text": 0}
    block = next(m for n, m in checkpointed.unet.named_modules() if n.endswith("transformer_blocks.0"))
    block.attn1.register_forward_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    encoder = checkpointed.text_encoders[1]
    layer = getattr(encoder, "text_model", encoder).encoder.layers[0]
    layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))

    expected, got = _lora_grads(plain, batch), _lora_grads(checkpointed, batch)
    assert calls == {"unet": 2, "text": 2}, "checkpointed blocks run again in the backward pass"
    assert expected.keys() == got.keys() and any(n.startswith("text_encoders.1") for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


def test_sdpa_attention_stays_on_and_compile_is_wired(tiny_models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    module = _module(tiny_models["sdxl"], train_text_encoder=True, compile_unet=True)
    processors = module.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    assert all(encoder.config._attn_implementation == "sdpa" for encoder in module.text_encoders)
    assert module.unet._compiled_call_impl is not None  # nn.Module.compile in place: names unchanged
    assert any("lora_A" in name for name, _ in module.unet.named_parameters())


def test_vae_dtype_defaults_to_float32_under_fp16_weights(tiny_models, demo_data):
    half = _module(tiny_models["sd1"], weight_dtype="float16")
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    assert _module(tiny_models["sd1"], weight_dtype="bfloat16").vae.dtype == torch.bfloat16
    assert _module(tiny_models["sd1"], weight_dtype="float16", vae_dtype="float16").vae.dtype == torch.float16
    # bf16 autocast does not reach the VAE: an fp32 VAE encodes in fp32 even inside autocast.
    module = _module(tiny_models["sd1"], weight_dtype="bfloat16", vae_dtype="float32")
    seen = []
    module.vae.encoder.conv_in.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = module.step.latents(_batch(demo_data), torch.Generator().manual_seed(0), module.device)
    assert seen == [torch.float32] and torch.isfinite(latents).all()


def test_fp16_weights_train_with_an_fp32_vae(tiny_models, demo_data, tmp_path):
    _, module = train(tiny_models["sd1"], demo_data, tmp_path, max_steps=2, weight_dtype="float16")
    assert module.vae.dtype == torch.float32
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora)


class _GradNorms:
    """Callback: total LoRA gradient norm as the optimizer saw it (after Lightning's clipping)."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        self.norms = []
        outer = self

        class Recorder(Callback):
            def on_before_zero_grad(self, trainer, pl_module, optimizer):
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                if grads:
                    outer.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        self.callback = Recorder()


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit"])
def test_max_grad_norm_and_accumulation_are_lightnings_and_work_here(optimizer, tiny_models, demo_data, tmp_path):
    unclipped, clipped = _GradNorms(), _GradNorms()
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "a",
        max_steps=2,
        optimizer=optimizer,
        learning_rate=1e-2,
        trainer_kwargs={"callbacks": [unclipped.callback]},
    )
    trainer, _ = train(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "b",
        max_steps=2,
        optimizer=optimizer,
        learning_rate=1e-2,
        trainer_kwargs={"callbacks": [clipped.callback], "gradient_clip_val": 1e-4, "accumulate_grad_batches": 2},
    )
    assert min(unclipped.norms) > 1e-3, "without clipping the gradients are larger than the clip value"
    assert clipped.norms and max(clipped.norms) <= 1e-4 * 1.001
    assert trainer.global_step == 2 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
