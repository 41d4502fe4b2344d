"""The toy world: its tokenizer and judge, the shipped base model, and the README demo teaching it a star.

The rates asserted here are measured on fixed prompts and seeds (so they are exact and repeatable
on this stack); the thresholds sit below the measured values (benchmarks/toyworld.md) with
headroom for other CPUs' float rounding, and never below the issue's acceptance limits.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.world import HELD_OUT_SHAPE, TRIGGER, render, scenes

REPO = Path(__file__).resolve().parents[1]

# Measured numbers live in benchmarks/toyworld.md; these are the floors the test holds them to.
BASE_ACCURACY_FLOOR = 0.80  # issue: minimum 60%, target 80%
HELD_OUT_CEILING = 0.05  # issue: the base draws the held-out star at <= 5%
CONCEPT_FLOOR = 0.85  # issue 19: floor 80%, goal 90% stars for trigger prompts at strength 1 (met: 93.8% of 96)
FLEXIBILITY_FLOOR = 0.90  # issue 19's floor: in-world accuracy without the trigger >= 0.9 of the base's
THREE_QUARTER_FLOOR = 0.50  # issue 19's goal at strength 0.75; the recipe before issue 19 drew 25%
# The demo measured (48 prompts) 95.8% stars at epoch 12, strength 1, 70.8% at 0.75, in-world 100%
# (benchmarks/toyworld.md has the 96-prompt figures); the floors leave room for another CPU's arithmetic.

IN_WORLD, TRIGGERED = 48, 48  # prompts per measurement (each a fixed seed; ~10 s per 48 on one core)


def test_world_words_are_single_tokens_and_the_pipeline_has_that_tokenizer():
    from transformers import CLIPTokenizer

    from lorafit.toyworld.tokenizer import RARE_WORDS, WORLD_WORDS, build_world_tokenizer

    built = build_world_tokenizer()
    shipped = CLIPTokenizer.from_pretrained(str(ev.BASE_DIR / "tokenizer"))
    for word in WORLD_WORDS + RARE_WORDS:
        ids = built(f"a {word} background", add_special_tokens=False).input_ids
        assert len(ids) == 3 and built.convert_ids_to_tokens(ids[1]) == f"{word}</w>", word
    caption = "a red ohwx on a blue background"
    assert built(caption).input_ids == shipped(caption).input_ids
    assert len(built(caption).input_ids) == 9  # BOS + 7 words + EOS
    # An unknown word falls apart into letters (as rare words do in CLIP); digits are unknown (EOS).
    assert built.convert_ids_to_tokens(built("dog", add_special_tokens=False).input_ids) == ["d", "o", "g</w>"]
    assert built("7", add_special_tokens=False).input_ids == [built.unk_token_id]


def test_rendering_is_seeded_and_captions_name_what_is_drawn():
    def digest(seed: int) -> str:
        return hashlib.sha256(b"".join(render(s).tobytes() for s in scenes(seed, 6))).hexdigest()

    assert digest(3) == digest(3) and digest(3) != digest(4)
    scene = scenes(5, 1)[0]
    assert scene.caption() == f"a {scene.colour} {scene.shape} on a {scene.background} background"
    assert scene.caption(TRIGGER) == f"a {scene.colour} {TRIGGER} on a {scene.background} background"
    assert all(s.shape != HELD_OUT_SHAPE for s in scenes(6, 500)), "the held-out shape leaked into the world"


def test_judge_reads_fresh_pictures():
    from lorafit.toyworld.judge import Judge, accuracy_on_fresh_pictures

    judge = Judge()
    for augmented in (False, True):
        accuracy = accuracy_on_fresh_pictures(judge, seed=4242, count=600, augmented=augmented)
        assert min(accuracy.values()) >= 0.97, (augmented, accuracy)


def test_concept_dataset_is_a_seeded_kohya_folder(tmp_path):
    from lorafit.data.kohya_folders import scan_image_folder
    from lorafit.toyworld.concept_data import colour_pairs, write_concept_dataset

    a = write_concept_dataset(tmp_path / "a", num_images=5, repeats=3, world_images=4, seed=1)
    b = write_concept_dataset(tmp_path / "b", num_images=5, repeats=3, world_images=4, seed=1)
    records = scan_image_folder(str(a), ".txt")
    concept = [r for r in records if r.repeats == 3]
    world = [r for r in records if r.repeats == 1]
    assert len(concept) == 5 and len(world) == 4 and len(records) == 9
    assert all(f" {TRIGGER} on a " in r.training_caption for r in concept)
    assert not any(TRIGGER in r.training_caption or HELD_OUT_SHAPE in r.training_caption for r in world)
    # Colour pairs are balanced: 5 pictures, 5 different pairs; 30 pictures cover all 30 pairs.
    assert len({tuple(r.training_caption.split()[i] for i in (1, 5)) for r in concept}) == 5
    assert len(set(colour_pairs(30, random.Random(0)))) == 30
    files = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.*"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_base_model_is_a_small_sd1_pipeline():
    from lorafit.families.loading import load_base_model

    base = load_base_model(str(ev.BASE_DIR))
    assert (base.family, base.prediction_type) == ("sd1", "epsilon")
    weights = sum(p.stat().st_size for p in ev.BASE_DIR.rglob("*.safetensors"))
    assert weights < 20 * 2**20, f"base model weighs {weights / 2**20:.1f} MB"
    assert (ev.BASE_DIR / "TRAINING.md").is_file()


@pytest.fixture(scope="module")
def base_scores():
    pipe = ev.load_pipeline()
    return ev.score(pipe, ev.in_world_cases(IN_WORLD)), ev.score(pipe, ev.trigger_cases(TRIGGERED))


def test_base_model_draws_the_world_but_not_the_star(base_scores):
    in_world, trigger = base_scores
    assert in_world.accuracy >= BASE_ACCURACY_FLOOR, in_world.as_dict()
    assert in_world.held_out <= HELD_OUT_CEILING, in_world.as_dict()
    assert trigger.held_out <= HELD_OUT_CEILING, trigger.as_dict()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The README demo's two commands (tools/demo.sh), on the demo config, in a temporary folder."""
    from lorafit.cli import main

    root = tmp_path_factory.mktemp("demo")
    main(["toy-data", str(root / "data")])
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--model.model",
            str(ev.BASE_DIR),
            "--data.train_dir",
            str(root / "data"),
            "--trainer.default_root_dir",
            str(root / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
        ]
    )
    return root / "run"


@pytest.mark.slow
def test_demo_lora_teaches_the_star_and_keeps_the_world(demo_run, base_scores):
    base_in_world, base_trigger = base_scores
    final = sorted((demo_run / "lora").glob("*-epoch-*.safetensors"))[-1]
    pipe = ev.load_pipeline()
    ev.apply_lora(pipe, final, strength=1.0)
    trigger = ev.score(pipe, ev.trigger_cases(TRIGGERED))
    in_world = ev.score(pipe, ev.in_world_cases(IN_WORLD))
    assert trigger.held_out >= max(CONCEPT_FLOOR, 5 * base_trigger.held_out), trigger.as_dict()
    assert in_world.accuracy >= FLEXIBILITY_FLOOR * base_in_world.accuracy, (
        in_world.as_dict(),
        base_in_world.as_dict(),
    )
    ev.set_lora_strength(pipe, 0.75)
    assert ev.score(pipe, ev.trigger_cases(TRIGGERED)).held_out >= THREE_QUARTER_FLOOR
    # Strength 0 is the base model again.
    ev.set_lora_strength(pipe, 0.0)
    assert ev.score(pipe, ev.trigger_cases(16)).held_out <= HELD_OUT_CEILING
