"""Training specifics of Qwen-Image, Z-Image, FLUX.2 [klein], Chroma and SD3.5 on their tiny pipelines: cached LLM
embeddings of different lengths train as the uncached step, the shipped configs train, the shifts are
the anchors', and `lorafit generate` draws with a trained LoRA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_flags import cpu_fit_flags
from family_reference import NEW_FAMILIES
from training import train

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.families.registry import get_family
from lorafit.training.config import LossConfig, NoiseConfig
from lorafit.training.flow_matching import FlowMatchingObjective

REPO = Path(__file__).resolve().parents[1]
BUCKETS = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128)
# Token budgets the tiny models' captions fit in (their tokenizers read one token per character).
TOKENS = {"qwen-image": 256, "z-image": 96, "flux2-klein": 96, "chroma": 96, "sd3": 96}


def test_resolution_shifts_are_the_anchors():
    """Qwen-Image: its pipeline's calculate_shift with its scheduler's constants (musubi-tuner's qwen_shift);
    FLUX.2: musubi-tuner's flux2_shift (FLUX.1's line on the patch count); Chroma: its pipeline's (FLUX.1's,
    kohya's flux_shift); Z-Image, SD3: none (a fixed shift)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    chroma = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}

    qwen = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9}
    for side in (64, 128, 166):  # latent sides of 512, 1024, 1328 px
        tokens = (side // 2) ** 2
        expected = math.exp(calculate_shift(tokens, 256, 8192, 0.5, 0.9))
        assert get_family("qwen-image").resolution_shift(side, side, qwen) == pytest.approx(expected)
        flux2 = math.exp(0.5 + 0.65 * (tokens - 256) / 3840)
        assert get_family("flux2-klein").resolution_shift(side, side, {}) == pytest.approx(flux2)
        assert get_family("chroma").resolution_shift(side, side, chroma) == pytest.approx(flux2)
        assert get_family("flux").resolution_shift(side, side, chroma) == pytest.approx(flux2)
    assert get_family("qwen-image").resolution_shift(166, 166, qwen) == pytest.approx(2.3, abs=0.05)  # ~2.2-2.3
    assert get_family("z-image").resolution_shift(128, 128, {}) is None
    assert get_family("sd3").resolution_shift(128, 128, {}) is None
    with pytest.raises(LorafitError, match="Z-Image has no resolution-dependent shift"):
        FlowMatchingObjective(get_family("z-image"), {}, NoiseConfig(shift="resolution"), LossConfig())


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_cached_text_embeddings_train_as_the_uncached_step(family_models, demo_data, tmp_path, family):
    import io
    import tarfile

    from lorafit.data.cache import cache
    from lorafit.data.prepare import prepare

    prepared, cached = tmp_path / "prepared", tmp_path / "cached"
    prepare(demo_data, out=str(prepared), **BUCKETS)
    cache(
        str(prepared),
        out=str(cached),
        model=family_models[family],
        text_embeddings=True,
        max_sequence_length=TOKENS[family],
        **BUCKETS,
    )
    lengths = set()
    for shard in cached.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".prompt_embeds.pth"):
                    lengths.add(torch.load(io.BytesIO(tar.extractfile(member).read())).shape[0])
    # Masked families store each caption's real tokens (the batch pads them again); FLUX.2 pads to the budget,
    # SD3 to CLIP's 77 tokens followed by the budget.
    budget = TOKENS[family]
    fixed = {"flux2-klein": budget, "sd3": 77 + budget}.get(family)
    assert (lengths == {fixed}) if fixed else (len(lengths) > 1 and max(lengths) < budget)
    settings = dict(conditioning={"max_sequence_length": budget}, max_steps=2, batch_size=4)
    from_shards = {"train_dir": None, "shards": str(cached)}
    _, from_cache = train(family_models[family], demo_data, tmp_path / "a", data_kwargs=from_shards, **settings)
    _, from_images = train(family_models[family], demo_data, tmp_path / "b", **settings)
    assert from_cache.host_parts.names == ("vae", "text_encoders")  # the LLM never went to the training device
    cached_weights, image_weights = from_cache.lora_weights(), from_images.lora_weights()
    for module, weights in image_weights["transformer"].items():
        torch.testing.assert_close(cached_weights["transformer"][module].up, weights.up, rtol=1e-4, atol=1e-6)
    with pytest.raises(LorafitError, match=f"max_sequence_length {budget}, but this run reads"):
        train(family_models[family], demo_data, tmp_path / "c", max_steps=1, data_kwargs=from_shards)


def _fit(config: str, model: str, data: str, root: Path, *extra: str) -> None:
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config),
            "--model.model",
            model,
            "--model.weight_dtype",
            "float32",
            "--model.optimizer.name",
            "AdamW",
            "--model.conditioning.max_sequence_length",
            "96",
            *cpu_fit_flags(data, str(root), max_steps=2, no_samples=True),
            *extra,
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_family_config_trains_a_step_on_the_tiny_model(family_models, demo_data, tmp_path, family):
    _fit(f"{family}.yaml", family_models[family], demo_data, tmp_path)
    name = f"{family}-lora"
    assert (tmp_path / "lora" / f"{name}.safetensors").is_file()
    assert (tmp_path / "lora" / "diffusers" / f"{name}.safetensors").is_file()


def test_the_qwen_image_lowvram_preset_asks_for_an_nf4_base(family_models, demo_data, tmp_path, capsys):
    if torch.cuda.is_available():  # bitsandbytes quantizes there; tools/gpu_check.sh covers it
        return
    with pytest.raises(SystemExit):
        _fit(
            "qwen-image.yaml",
            family_models["qwen-image"],
            demo_data,
            tmp_path,
            "--config",
            str(REPO / "configs" / "presets" / "qwen-image-lowvram.yaml"),
        )
    assert "model.quantization: nf4 needs a CUDA GPU" in capsys.readouterr().err


GENERATE = [NEW_FAMILIES[0], *(pytest.param(family, marks=pytest.mark.slow) for family in NEW_FAMILIES[1:])]


@pytest.mark.parametrize("family", GENERATE)
def test_generate_draws_with_the_lora_and_strength_zero_is_the_base(family_models, demo_data, tmp_path, family):
    import numpy as np
    from PIL import Image

    train(family_models[family], demo_data, tmp_path / "run", max_steps=3, learning_rate=1e-2)
    lora = tmp_path / "run" / "lora" / "test.safetensors"

    def draw(out: str, *extra: str) -> np.ndarray:
        main(
            [
                "generate",
                family_models[family],
                "--prompt",
                "ohwx star --w 64 --h 64 --s 2 --l 4 --d 7",
                "--out",
                str(tmp_path / out),
                "--render.steps",
                "2",
                *extra,
            ]
        )
        (png,) = sorted((tmp_path / out).glob("*.png"))
        return np.asarray(Image.open(png), dtype=np.int16)

    base, with_lora = draw("base"), draw("lora", "--lora", f"{lora}:1.0")
    assert np.abs(base - with_lora).max() > 0, "the LoRA changed nothing"
    assert np.array_equal(draw("zero", "--lora", f"{lora}:0"), base)  # strength 0 is the base model
