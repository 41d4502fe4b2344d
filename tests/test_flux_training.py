"""FLUX.1 training specifics: the flow-matching objective as the anchors define it, guidance, cached
T5/CLIP embeddings, fp8 storage, and the shipped configs on the tiny Flux."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_flags import cpu_fit_flags
from training import tiny_batch, train

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.families.loading import load_base_model
from lorafit.families.registry import get_family
from lorafit.families.tiny import save_tiny_pipeline
from lorafit.training.config import LossConfig, NoiseConfig
from lorafit.training.flow_matching import FlowMatchingObjective, shifted
from lorafit.training.module import LoraDiffusionModule

REPO = Path(__file__).resolve().parents[1]
FLUX = get_family("flux")


def test_the_model_sees_the_straight_path_and_regresses_the_velocity():
    objective = FlowMatchingObjective(FLUX, {}, NoiseConfig(shift=1.0), LossConfig())
    latents, noise = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    draw = objective.at(latents, noise, sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(draw.noisy, (1 - s) * latents + s * noise)
    torch.testing.assert_close(draw.target, noise - latents)
    assert torch.equal(draw.timesteps, sigmas)  # the transformer takes the sigma itself (FluxPipeline: t / 1000)


def test_the_resolution_shift_is_the_one_flux_inference_samples_with():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    objective = FlowMatchingObjective(FLUX, dict(scheduler.config), NoiseConfig(), LossConfig())
    u = torch.linspace(0.05, 0.95, 7)
    for latent_side in (64, 128):  # 512 and 1024 px
        mu = calculate_shift((latent_side // 2) ** 2, 256, 4096, 0.5, 1.15)
        expected = scheduler.time_shift(mu, 1.0, u)
        torch.testing.assert_close(shifted(u, objective.shift_for((latent_side, latent_side))), expected)
    assert objective.shift_for((128, 128)) > objective.shift_for((64, 64)) > 1  # bigger images: noisier


@pytest.mark.parametrize(
    "noise, check",
    [
        (NoiseConfig(timestep_sampling="uniform", shift=1.0), lambda s: abs(float(s.mean()) - 0.5) < 0.02),
        (NoiseConfig(timestep_sampling="sigmoid", shift=1.0), lambda s: abs(float(s.median()) - 0.5) < 0.02),
        (
            NoiseConfig(timestep_sampling="logit_normal", logit_mean=1.0, shift=1.0),
            lambda s: abs(float(s.median()) - 1 / (1 + math.exp(-1))) < 0.02,
        ),
        (NoiseConfig(timestep_sampling="uniform", shift=3.0), lambda s: float(s.mean()) > 0.65),
    ],
)
def test_sigma_sampling_follows_the_configured_distribution(noise, check):
    objective = FlowMatchingObjective(FLUX, {}, noise, LossConfig())
    sigmas = objective.sigmas(20000, torch.Generator().manual_seed(0), "cpu", (64, 64))
    assert float(sigmas.min()) >= 0 and float(sigmas.max()) <= 1 and check(sigmas)


def test_flow_loss_weightings_are_sd3s():
    prediction, target = torch.ones(2, 16, 4, 4), torch.zeros(2, 16, 4, 4)
    sigmas = torch.tensor([0.25, 0.75])
    none = FlowMatchingObjective(FLUX, {}, NoiseConfig(), LossConfig()).loss(prediction, target, sigmas)
    sqrt = FlowMatchingObjective(FLUX, {}, NoiseConfig(), LossConfig(weighting="sigma_sqrt")).loss(
        prediction, target, sigmas
    )
    assert float(none) == pytest.approx(1.0)
    assert float(sqrt) == pytest.approx(float((sigmas**-2).mean()))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory) -> str:
    return str(save_tiny_pipeline("flux-schnell", tmp_path_factory.mktemp("schnell") / "flux-schnell"))


def _loss(model: str, batch: dict, **kwargs) -> float:
    module = LoraDiffusionModule(model=model, **kwargs)
    module.configure_model()
    with torch.no_grad():
        return float(module.denoising_loss(batch, torch.Generator().manual_seed(0)))


def test_training_guidance_reaches_dev_only_and_t5_length_follows_the_variant(tiny_models, schnell, demo_data):
    batch = tiny_batch(demo_data, 2)
    dev = tiny_models["flux"]
    assert _loss(dev, batch, conditioning={"guidance": 1.0}) != _loss(dev, batch, conditioning={"guidance": 4.0})
    assert _loss(schnell, batch, conditioning={"guidance": 1.0}) == _loss(
        schnell, batch, conditioning={"guidance": 4.0}
    )
    for model, tokens in ((dev, 512), (schnell, 256)):  # the pipelines' defaults
        module = LoraDiffusionModule(model=model)
        module.configure_model()
        assert module.text_conditioning(batch)["prompt_embeds"].shape[1] == tokens


def test_cached_t5_and_clip_embeddings_train_as_the_uncached_step_and_stay_off_the_device(
    tiny_models, demo_data, tmp_path
):
    from lorafit.data.cache import cache
    from lorafit.data.prepare import prepare

    buckets = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    prepared, cached = tmp_path / "prepared", tmp_path / "cached"
    prepare(demo_data, out=str(prepared), **buckets)
    cache(
        str(prepared),
        out=str(cached),
        model=tiny_models["flux"],
        text_embeddings=True,
        max_sequence_length=64,
        **buckets,
    )
    settings = dict(conditioning={"max_sequence_length": 64})
    _, from_cache = train(
        tiny_models["flux"],
        demo_data,
        tmp_path / "a",
        max_steps=2,
        data_kwargs={"train_dir": None, "shards": str(cached)},
        **settings,
    )
    _, from_images = train(tiny_models["flux"], demo_data, tmp_path / "b", max_steps=2, **settings)
    assert from_cache.host_parts.names == ("vae", "text_encoders")  # T5 never went to the training device
    cached_weights, image_weights = from_cache.lora_weights(), from_images.lora_weights()
    for module, weights in image_weights["transformer"].items():
        torch.testing.assert_close(cached_weights["transformer"][module].up, weights.up, rtol=1e-4, atol=1e-6)
    with pytest.raises(LorafitError, match="max_sequence_length 64, but this run reads 512"):
        train(
            tiny_models["flux"],
            demo_data,
            tmp_path / "c",
            max_steps=1,
            data_kwargs={"train_dir": None, "shards": str(cached)},
        )


def test_fp8_storage_trains_float32_adapters_and_nf4_says_it_needs_a_gpu(tiny_models, demo_data, tmp_path):
    _, module = train(
        tiny_models["flux"], demo_data, tmp_path, max_steps=2, weight_dtype="bfloat16", quantization="fp8"
    )
    stored = {p.dtype for n, p in module.transformer.named_parameters() if "lora_" not in n and n.endswith("weight")}
    assert torch.float8_e4m3fn in stored
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora)
    assert any(float(p.abs().max()) > 0 for n, p in module.named_parameters() if "lora_B" in n)
    if not torch.cuda.is_available():
        with pytest.raises(LorafitError, match="model.quantization: nf4 needs a CUDA GPU"):
            load_base_model(tiny_models["flux"], quantization="nf4")


@pytest.mark.slow
def test_a_quantized_base_lifts_the_clis_bitsandbytes_block(tiny_models):
    """The CLI keeps bitsandbytes unimportable (its import is noisy); asking for NF4 must lift that, so
    the run gets as far as bitsandbytes itself (here: no CUDA GPU), not "install bitsandbytes"."""
    import subprocess
    import sys

    script = (
        "from lorafit.cli.startup import block_optional_imports\n"
        "block_optional_imports()\n"
        "from lorafit.errors import LorafitError\n"
        "from lorafit.families.loading import load_base_model\n"
        "try:\n"
        f"    load_base_model({str(tiny_models['flux'])!r}, quantization='nf4')\n"
        "except LorafitError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    expected = "needs a CUDA GPU" if not torch.cuda.is_available() else ""
    assert "needs bitsandbytes" not in done.stdout and expected in done.stdout, done.stdout + done.stderr


def test_the_flux_config_trains_a_step_on_the_tiny_flux(tiny_models, demo_data, tmp_path):
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "flux.yaml"),
            "--model.model",
            tiny_models["flux"],
            "--model.weight_dtype",
            "float32",
            "--model.optimizer.name",
            "AdamW",
            *cpu_fit_flags(demo_data, str(tmp_path), max_steps=2, no_samples=True),
        ]
    )
    assert (tmp_path / "lora" / "flux-lora.safetensors").is_file()
    assert (tmp_path / "lora" / "diffusers" / "flux-lora.safetensors").is_file()


def test_generate_draws_with_a_flux_lora_and_kohya_guidance(tiny_models, demo_data, tmp_path):
    import numpy as np
    from PIL import Image

    train(tiny_models["flux"], demo_data, tmp_path / "run", max_steps=3, learning_rate=1e-2)
    lora = tmp_path / "run" / "lora" / "test.safetensors"

    def draw(out: str, *extra: str) -> np.ndarray:
        main(
            [
                "generate",
                tiny_models["flux"],
                "--prompt",
                "ohwx star --w 64 --h 64 --s 3 --d 7",
                "--out",
                str(tmp_path / out),
                "--render.steps",
                "3",
                *extra,
            ]
        )
        (png,) = sorted((tmp_path / out).glob("*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    base, with_lora = draw("base"), draw("lora", "--lora", f"{lora}:1.0")
    assert np.abs(base - with_lora).max() > 0, "the LoRA changed nothing"
    guided = draw("guided", "--prompt", "ohwx star --w 64 --h 64 --s 3 --d 7 --g 7")
    assert np.abs(base - guided).max() > 0, "--g did not reach the guidance embedding"
    assert np.array_equal(draw("zero", "--lora", f"{lora}:0"), base)  # strength 0 is the base model
