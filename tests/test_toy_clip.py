"""The toy world's CLIP (lorafit/toyworld/clip): loads and scores like a real CLIP, through torchmetrics,
and gives ``lorafit probe`` the right verdict on the toy base where a random CLIP cannot.

The thresholds sit below values measured on this stack (benchmarks/toyworld.md) with headroom.
"""

from __future__ import annotations

import random

import pytest
import torch

from lorafit.inference.clip_scores import ClipScorer
from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.toy_clip import CLIP_DIR, captions_for, consistency, zero_shot_accuracy
from lorafit.toyworld.world import render, sample_scene


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(str(CLIP_DIR))


def _pictures(shape: str, count: int, seed: int = 0, colour=None, background=None):
    rng = random.Random(seed)
    return [render(sample_scene(rng, (shape,), colour, background)) for _ in range(count)]


def test_it_is_a_small_transformers_clip_that_reads_the_world(scorer):
    weights = sum(p.stat().st_size for p in CLIP_DIR.glob("*.safetensors"))
    assert weights < 2 * 2**20, f"toy CLIP weighs {weights / 2**20:.1f} MB"
    accuracy = zero_shot_accuracy(scorer.scored.model, scorer.processor, count=400)
    assert accuracy["shape"] >= 0.85 and accuracy["colour"] >= 0.97 and accuracy["background"] >= 0.97, accuracy


def test_image_scores_tell_a_star_from_a_circle_whatever_the_colours(scorer):
    stars = _pictures("star", 8, seed=1)
    closer = scorer.similarity_to_set(_pictures("star", 6, seed=2), stars)
    farther = scorer.similarity_to_set(_pictures("circle", 6, seed=2), stars)  # same colours as the stars above
    assert min(closer) > max(farther), (closer, farther)


def test_text_scores_prefer_the_prompt_that_describes_the_picture(scorer):
    pictures = _pictures("circle", 4, colour="red", background="blue")
    right = scorer.text_similarity(pictures, ["a red circle on a blue background"] * 4)
    for wrong in ("a red square on a blue background", "a green circle on a blue background", "a red star"):
        assert right > scorer.text_similarity(pictures, [wrong] * 4) + 0.05, wrong


def test_fid_feature_extractor_gives_embeddings_torchmetrics_accepts(scorer):
    from torchmetrics.image.kid import KernelInceptionDistance

    features = scorer.image_features()
    kid = KernelInceptionDistance(feature=features, subset_size=8)

    def batch(shape, seed):
        import numpy as np

        return torch.from_numpy(np.stack([np.asarray(p) for p in _pictures(shape, 16, seed)])).permute(0, 3, 1, 2)

    kid.update(batch("star", 3), real=True)
    kid.update(batch("star", 4), real=False)
    same = kid.compute()[0]
    kid.reset()
    kid.update(batch("star", 3), real=True)
    kid.update(batch("circle", 4), real=False)
    assert kid.compute()[0] > same + 0.01


def test_soft_targets_count_every_true_caption():
    import numpy as np

    labels = torch.tensor([[3, 0, 2], [3, 1, 2], [0, 0, 2]])  # red star on blue, green star on blue, red circle
    captions, claims = captions_for(labels.numpy(), random.Random(0))
    assert all(isinstance(c, str) for c in captions)
    star = torch.tensor([[3, -2, -2]])  # "a star"
    red_on_blue = torch.tensor([[-2, 0, 2]])  # "a red ... on a blue background"
    assert consistency(labels, star).flatten().tolist() == [1, 1, 0]
    assert consistency(labels, red_on_blue).flatten().tolist() == [1, 0, 1]
    assert np.all(consistency(labels, torch.from_numpy(claims)).diagonal().numpy() == 1)


@pytest.mark.parametrize(("shape", "phrasing", "verdict"), [("star", "a red star on a blue background", "unknown"),
                                                             ("circle", "a red circle on a blue background",
                                                              "performs_well")])  # fmt: skip
def test_probe_with_the_toy_clip_says_train_a_lora_for_the_star_and_not_for_a_circle(
    shape, phrasing, verdict, tmp_path, capsys
):
    from lorafit.cli import main

    data = tmp_path / "data"
    main(["toy-data", str(data), "--world_images", "0", "--shape", shape])
    main(
        [
            "probe",
            str(ev.BASE_DIR),
            "--data",
            str(data),
            "--phrasing",
            phrasing,
            "--clip_model",
            str(CLIP_DIR),
            "--steps",
            "20",
            "--cfg",
            "4",
            "--sampler",
            "ddim",
            "--out",
            str(tmp_path / "probe"),
        ]
    )
    import json

    summary = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert summary["verdict"] == verdict, summary["explanation"]
