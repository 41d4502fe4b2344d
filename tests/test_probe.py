"""`lorafit probe`: end to end on the tiny model from a prepared dataset, and the verdict rules."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from lorafit.cli import main
from lorafit.inference.probe_verdict import PhrasingScore, Thresholds, decide
from lorafit.inference.reference_images import load_reference_set


@pytest.fixture(scope="module")
def prepared(demo_data, tmp_path_factory):
    from lorafit.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(demo_data, out=str(out), resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    return out


def test_reference_set_from_prepared_dataset_and_folder(prepared, demo_data):
    from_shards = load_reference_set(str(prepared), limit=3)
    from_folder = load_reference_set(demo_data, limit=3)
    for reference in (from_shards, from_folder):
        assert len(reference.images) == 3 and all(im.mode == "RGB" for im in reference.images)
        assert reference.subject == "ohwx star" and reference.class_word == "star"
        assert all(c.startswith("ohwx star") for c in reference.captions)


def test_probe_end_to_end_prints_a_verdict_with_scores(prepared, tiny_models, tiny_clip, tmp_path, capsys):
    out = tmp_path / "probe"
    main(
        [
            "probe",
            tiny_models["sdxl"],
            "--data",
            str(prepared),
            "--phrasing",
            "a star shape",
            "--description",
            "a yellow five-pointed star on a plain background",
            "--captions",
            "2",
            "--render.seed",
            "0",
            "--render.seed",
            "1",
            "--render.steps",
            "2",
            "--render.cfg",
            "1",
            "--clip_model",
            tiny_clip,
            "--base.device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    titles = (
        "already performs well",
        "recognizes the concept but lacks consistency",
        "gets close to the concept",
        "doesn't recognize the concept",
    )
    assert printed[0].startswith("verdict: the base model ") and any(t in printed[0] for t in titles)
    assert printed[1].startswith("  what to do: ")
    assert re.match(r"  method: (prompt|embedding|lora): ", printed[2])
    assert re.search(
        r"control prompt -?\d\.\d{3} \(closeness 0\) to training images among themselves -?\d\.\d{3}", printed[3]
    )
    rows = printed[4:]
    assert [r.split()[0] for r in rows] == ["caption", "caption", "synonym", "description", "control"]
    assert all(re.search(r"similarity +-?\d\.\d{3} +closeness +-?\d+\.\d\d +\d+% good", r) for r in rows)
    summary = json.loads((out / "probe.json").read_text())
    assert summary["verdict"] in ("performs_well", "inconsistent", "gets_close", "unknown")
    assert summary["method"] == {"performs_well": "prompt", "unknown": "lora"}.get(summary["verdict"], "embedding")
    assert len(summary["scores"]) == 5 and all(len(s["similarities"]) == 2 for s in summary["scores"])
    # Sheet: a row of training images above one row per phrasing, two seeds wide.
    sheet = Image.open(out / "probe.png")
    assert sheet.height > 6 * 64 and sheet.width > 2 * 64
    assert len(list((out / "images").glob("*.png"))) == 5 * 2
    assert "Verdict: the base model" in (out / "index.html").read_text()


def _score(kind: str, similarities: list[float]) -> PhrasingScore:
    return PhrasingScore(kind, kind, similarities)


@pytest.mark.parametrize(
    "caption, description, expected",
    [
        ([0.89, 0.90, 0.88, 0.92], [0.60, 0.61, 0.62, 0.60], "performs_well"),  # 4/4 seeds near the ceiling
        ([0.89, 0.62, 0.61, 0.60], [0.60, 0.61, 0.62, 0.60], "inconsistent"),  # 1/4 seeds
        ([0.75, 0.76, 0.74, 0.77], [0.60, 0.61, 0.62, 0.60], "gets_close"),  # mean closeness ~0.5-0.6
        ([0.62, 0.63, 0.60, 0.61], [0.64, 0.62, 0.63, 0.60], "unknown"),
    ],
)
def test_verdict_rules(caption, description, expected):
    control = _score("control", [0.60, 0.60, 0.60, 0.60])
    verdict = decide([_score("caption", caption), _score("description", description)], control, ceiling=0.90)
    assert verdict.key == expected and verdict.reliable
    assert verdict.floor == pytest.approx(0.60) and verdict.ceiling == 0.90
    assert verdict.best.closeness == pytest.approx([(s - 0.6) / 0.3 for s in verdict.best.similarities])


def test_gets_close_names_the_closest_phrasing_and_thresholds_are_tunable():
    control = _score("control", [0.5, 0.5])
    phrasings = [_score("caption", [0.6, 0.6]), _score("description", [0.8, 0.8])]
    verdict = decide(phrasings, control, ceiling=1.0)
    assert verdict.key == "gets_close" and verdict.best.kind == "description"
    assert "best phrasing (description)" in verdict.explanation
    assert decide(phrasings, control, 1.0, Thresholds(good=0.55, consistent=0.5)).key == "performs_well"


def test_unreliable_clip_is_said_out_loud():
    verdict = decide([_score("caption", [0.9])], _score("control", [0.95]), ceiling=0.9)
    assert not verdict.reliable and verdict.key == "unknown" and "UNRELIABLE" in verdict.explanation


def test_probe_from_captions_only_draws_without_scores(tiny_models, tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("# my concept\nohwx star, a yellow star\n\n")
    out = tmp_path / "probe"
    main(
        [
            "probe",
            tiny_models["sd1"],
            "--data",
            str(captions),
            "--render.seed",
            "0",
            "--render.steps",
            "1",
            "--base.device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert "pass --clip_model for scores and a verdict" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["00-caption-seed0.png", "01-control-seed0.png"]
    with pytest.raises(SystemExit):
        main(["probe", tiny_models["sd1"], "--data", str(captions), "--clip_model", "x", "--out", str(out)])
    assert "holds captions only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "caption, family, method",
    [
        ([0.89, 0.90, 0.88, 0.92], "sdxl", "prompt"),  # performs well: prompt, whatever the family
        ([0.89, 0.62, 0.61, 0.60], "sd1", "embedding"),  # inconsistent: within a prompt's reach
        ([0.75, 0.76, 0.74, 0.77], "sdxl", "embedding"),  # gets close
        ([0.75, 0.76, 0.74, 0.77], "flux", "lora"),  # no textual inversion on Flux
        ([0.62, 0.63, 0.60, 0.61], "sdxl", "lora"),  # unknown: the denoiser must learn it
    ],
)
def test_probe_recommends_an_embedding_when_a_prompt_gets_close_else_a_lora(caption, family, method):
    from lorafit.inference.probe_method import recommend_method

    control = _score("control", [0.60, 0.60, 0.60, 0.60])
    verdict = decide([_score("caption", caption)], control, ceiling=0.90)
    recommended = recommend_method(verdict, family, "ohwx dog", "dog")
    assert recommended.key == method
    if method == "embedding":  # the settings to start from: the trigger as the token, the class as init word
        assert "--model.embedding.token ohwx --model.embedding.init_word dog" in recommended.advice
