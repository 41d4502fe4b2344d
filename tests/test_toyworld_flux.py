"""The toy world on the FLUX.1 architecture: the shipped Flux base, lorafit drawing it as it was
trained (T5 length), and configs/demo-flux.yaml teaching it the star.

Rates are measured on fixed prompts and seeds (benchmarks/toyworld.md, the Flux section); the
floors below sit under the measured values and never below the issue's acceptance limits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lorafit.toyworld import flux_evaluate as fev

REPO = Path(__file__).resolve().parents[1]

BASE_ACCURACY_FLOOR = 0.80  # issue 16 point 9: the base draws in-world prompts >= 80% correct (goal 90%)
HELD_OUT_CEILING = 0.05  # the base never learnt the star
CONCEPT_FLOOR = 0.50  # after the demo: >= 50% stars for trigger prompts at strength 1
FLEXIBILITY_FLOOR = 0.80  # ... and >= 0.8 of the base's in-world accuracy without the trigger

IN_WORLD, TRIGGERED = 48, 48  # prompts per measurement, each a fixed seed


def demo_args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "demo-flux.yaml"),
        "--model.model",
        str(fev.BASE_DIR),
        "--data.train_dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        *extra,
    ]


def test_the_flux_base_is_a_small_flux_pipeline_with_the_world_tokenizers():
    from lorafit.families.family import TextOptions
    from lorafit.families.loading import load_base_model
    from lorafit.families.registry import get_family
    from lorafit.toyworld.flux_architecture import build_world_t5_tokenizer
    from lorafit.toyworld.tokenizer import RARE_WORDS, WORLD_WORDS, build_world_tokenizer

    base = load_base_model(str(fev.BASE_DIR))
    assert (base.family, base.prediction_type) == ("flux", "flow")
    assert type(base.denoiser).__name__ == "FluxTransformer2DModel"
    assert base.vae.config.latent_channels == 16 and base.vae.config.shift_factor
    assert not base.denoiser.config.guidance_embeds  # [schnell]'s layout, see flux_architecture.py
    # lorafit trains and draws with the 16 T5 tokens the base's tokenizer declares.
    assert get_family("flux").sequence_length(base, TextOptions()) == 16
    weights = sum(p.stat().st_size for p in fev.BASE_DIR.rglob("*.safetensors"))
    assert weights < 20 * 2**20, f"base model weighs {weights / 2**20:.1f} MB"
    assert (fev.BASE_DIR / "TRAINING.md").is_file()

    clip, t5 = base.tokenizers
    caption = "a red ohwx on a blue background"
    assert clip(caption).input_ids == build_world_tokenizer()(caption).input_ids
    assert t5(caption).input_ids == build_world_t5_tokenizer()(caption).input_ids
    for word in WORLD_WORDS + RARE_WORDS:  # one T5 piece per world word, as in the CLIP tokenizer
        assert t5.convert_ids_to_tokens(t5(word, add_special_tokens=False).input_ids) == [f"▁{word}"], word
    assert len(t5("dog", add_special_tokens=False).input_ids) == 4  # other words fall apart into letters


@pytest.fixture(scope="module")
def base_scores():
    pipe = fev.load_pipeline()
    return fev.score(pipe, fev.in_world_cases(IN_WORLD)), fev.score(pipe, fev.trigger_cases(TRIGGERED))


def test_the_flux_base_draws_the_world_but_not_the_star(base_scores):
    in_world, trigger = base_scores
    assert in_world.accuracy >= BASE_ACCURACY_FLOOR, in_world.as_dict()
    assert in_world.held_out <= HELD_OUT_CEILING, in_world.as_dict()
    assert trigger.held_out <= HELD_OUT_CEILING, trigger.as_dict()


def test_lorafit_generate_draws_the_flux_base_as_it_was_trained(tmp_path):
    """`lorafit generate` reads the 16 T5 tokens the base trained with (FluxPipeline's own default,
    512, feeds it 496 padding tokens it never saw), so it draws what the measurements draw."""
    from PIL import Image

    from lorafit.cli import main

    cases = fev.in_world_cases(6, seed=3)
    expected = fev.generate(fev.load_pipeline(), cases, guidance=1.0)
    for case, picture in zip(cases, expected):
        out = tmp_path / str(case.seed)
        main(
            [
                "generate",
                str(fev.BASE_DIR),
                "--prompt",
                case.prompt,
                "--render.seed",
                str(case.seed),
                "--render.sampler",
                "euler",
                "--render.steps",
                str(fev.STEPS),
                "--render.width",
                "32",
                "--out",
                str(out),
            ]
        )
        (png,) = out.glob("*.png")
        drawn = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
        assert np.abs(drawn - picture).max() <= 2, case.prompt


def test_flux_samples_and_generate_read_the_t5_length_the_run_trains_with(tiny_models):
    """FluxPipeline feeds T5's padding to the transformer unmasked, so a prompt must be encoded at
    the length training used: the run's ``max_sequence_length`` for its samples, the render option
    (else the family's default) for ``generate``."""
    from types import SimpleNamespace

    from lorafit.callbacks.samples import SampleImages
    from lorafit.families.loading import load_base_model
    from lorafit.inference.prompts import SamplePrompt
    from lorafit.inference.render import Renderer
    from lorafit.inference.render_options import RenderOptions
    from lorafit.training.config import ConditioningConfig

    base = load_base_model(tiny_models["flux"])
    lengths = []
    base.text_encoders[1].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    request = SamplePrompt("ohwx star").with_defaults(64, 64, 1, 1.0, 0, "euler")

    def t5_tokens(renderer) -> int:
        lengths.clear()
        renderer.encode(request)
        return lengths[-1]

    assert t5_tokens(Renderer(base)) == 512  # [dev]'s default, as in training
    assert t5_tokens(Renderer(base, max_sequence_length=64)) == 64
    run = SimpleNamespace(base=base, conditioning_config=ConditioningConfig(max_sequence_length=64))
    assert t5_tokens(SampleImages(prompts=["ohwx star"])._renderer_for(run)) == 64
    own = SampleImages(prompts=["ohwx star"], render=RenderOptions(max_sequence_length=128))
    assert t5_tokens(own._renderer_for(run)) == 128


def test_the_flux_demo_config_trains_a_step_on_the_shipped_base(tmp_path):
    from safetensors import safe_open

    from lorafit.cli import main
    from lorafit.toyworld.concept_data import write_concept_dataset

    data = write_concept_dataset(tmp_path / "data", num_images=4, repeats=2, world_images=4)
    main(
        demo_args(
            data, tmp_path / "run", "--trainer.max_steps", "1", "--data.batch_size", "4", "--samples.prompts", "[]"
        )
    )
    lora = tmp_path / "run" / "lora" / "ohwx-flux.safetensors"  # the final file, next to the epoch's
    with safe_open(str(lora), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    # kohya/BFL names of a Flux LoRA (fused qkv of the double blocks), and the CLIP encoder's LoRA.
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_t5xxl_max_token_length"] == "16"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The Flux demo's two commands (docs/toyworld.md), in a temporary folder."""
    from lorafit.cli import main

    root = tmp_path_factory.mktemp("demo-flux")
    main(["toy-data", str(root / "data")])
    main(demo_args(root / "data", root / "run"))
    return root / "run"


@pytest.mark.slow
def test_the_flux_demo_lora_teaches_the_star_and_keeps_the_world(demo_run, base_scores):
    base_in_world, base_trigger = base_scores
    final = sorted((demo_run / "lora").glob("*-epoch-*.safetensors"))[-1]
    pipe = fev.load_pipeline()
    fev.apply_lora(pipe, final, strength=1.0)
    trigger = fev.score(pipe, fev.trigger_cases(TRIGGERED))
    in_world = fev.score(pipe, fev.in_world_cases(IN_WORLD))
    assert trigger.held_out >= max(CONCEPT_FLOOR, 5 * base_trigger.held_out), trigger.as_dict()
    assert in_world.accuracy >= FLEXIBILITY_FLOOR * base_in_world.accuracy, (
        in_world.as_dict(),
        base_in_world.as_dict(),
    )
    fev.set_lora_strength(pipe, 0.0)  # strength 0 is the base model again
    assert fev.score(pipe, fev.trigger_cases(16)).held_out <= HELD_OUT_CEILING
