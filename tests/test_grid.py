"""`lorafit grid`: 3 epochs x 3 strengths x 2 prompts, labelled sheets, the HTML report with metrics."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from training import train

from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.inference.grid import check_axes, find_lora_files
from lorafit.inference.selection import EpochScore, suggest_epoch

CELL, GAP = 64, 4
PROMPTS = ["ohwx star, a yellow star", "a photo of a cat"]


@pytest.fixture(scope="module")
def grid_run(tiny_models, tiny_clip, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-run")
    train(tiny_models["sdxl"], demo_data, root, max_epochs=3, learning_rate=3e-2, data_kwargs={"repeats": 1})
    out = root / "grid"
    argv = [
        "grid",
        tiny_models["sdxl"],
        "--lora",
        str(root),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--strength",
        "0",
        "--strength",
        "0.5",
        "--strength",
        "1",
        "--render.steps",
        "2",
        "--render.cfg",
        "1",
        "--clip_model",
        tiny_clip,
        "--train_images",
        demo_data,
        "--flexibility_prompt",
        "a watercolor painting of {subject}",
        "--base.device",
        "cpu",
        "--out",
        str(out),
    ]
    main(argv)
    return out


def _cell(sheet: np.ndarray, row: int, col: int) -> np.ndarray:
    # Cells sit at the bottom right, after the label bands: the last one ends GAP px from the edge.
    height, width = sheet.shape[:2]
    y, x = height - (3 - row) * (CELL + GAP), width - (3 - col) * (CELL + GAP)
    return sheet[y : y + CELL, x : x + CELL]


def _cell_file(out, epoch: str, strength: str, prompt: int) -> np.ndarray:
    (path,) = list((out / "cells").glob(f"{epoch}_s{strength}_p{prompt:02d}_seed0_cfg1.png"))
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_labelled_sheet_per_prompt_of_the_right_size(grid_run):
    out = grid_run
    assert sorted(p.name for p in out.glob("grid*.png")) == ["grid-00.png", "grid-01.png"]
    for index in range(2):
        sheet = np.asarray(Image.open(out / f"grid-{index:02d}.png").convert("RGB"))
        height, width = sheet.shape[:2]
        label_width, label_height = width - 3 * (CELL + GAP) - GAP, height - 3 * (CELL + GAP) - GAP
        assert 20 < label_width < 200 and 10 < label_height < 100  # room for "strength 0.5" / "epoch 3"
        # Each cell is exactly the image saved for its (epoch, strength): placement and size are right.
        for row, strength in enumerate(("0", "0.5", "1")):
            for col in range(3):
                assert np.array_equal(_cell(sheet, row, col), _cell_file(out, f"epoch-{col + 1}", strength, index))
        # Labels are drawn: dark text pixels in the column band above and the row band left of every cell.
        top = sheet[:label_height, label_width:]
        assert (top.min(axis=2) < 100).sum() > 50
        for row in range(3):
            band = sheet[height - (3 - row) * (CELL + GAP) : height - (3 - row) * (CELL + GAP) + CELL, :label_width]
            assert (band.min(axis=2) < 100).sum() > 20


def test_strength_zero_row_is_the_base_model_and_epochs_differ_at_full_strength(grid_run):
    out = grid_run
    base = _cell_file(out, "base", "0", 0)
    for epoch in ("epoch-1", "epoch-2", "epoch-3"):
        assert np.array_equal(_cell_file(out, epoch, "0", 0), base)
    full = [_cell_file(out, e, "1", 0).astype(int) for e in ("epoch-1", "epoch-2", "epoch-3")]
    assert np.abs(full[0] - full[2]).max() > 0 and np.abs(full[2] - base).max() > 0
    parameters = Image.open(next((out / "cells").glob("epoch-2_s0.5_p01_*.png"))).text["parameters"]
    assert parameters.startswith("a photo of a cat <lora:test-epoch-002:0.5>\n")


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self._row, self._in_cell = [], [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._in_cell = True
            self._row.append("")
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self.rows.append(self._row)
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data


def test_html_report_lists_metrics_per_epoch_and_a_suggestion(grid_run):
    text = (grid_run / "index.html").read_text()
    parser = _Tables()
    parser.feed(text)
    rows = {row[0]: row[1:] for row in parser.rows if row}
    assert {"base model", "epoch 1", "epoch 2", "epoch 3"} <= rows.keys()
    for label in ("epoch 1", "epoch 2", "epoch 3"):
        fidelity, flexibility, balance = (float(v) for v in rows[label])
        assert -1 <= fidelity <= 1 and -1 <= flexibility <= 1 and 0 <= balance <= 1
    selection = json.loads((grid_run / "selection.json").read_text())
    assert selection["suggested"] in ("epoch 1", "epoch 2", "epoch 3")
    assert f"Suggested: {selection['suggested']} has the best balance" in text
    assert re.search(r'<tr class="chosen"><td>' + selection["suggested"], text)
    # Self-contained: every image inline, nothing fetched from elsewhere.
    assert len(parser.images) == 3 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "http" not in text.replace("http-equiv", "")


def test_suggestion_rule():
    scores = [
        EpochScore("base model", 0.50, 0.30, is_base=True),
        EpochScore("epoch 1", 0.60, 0.30),
        EpochScore("epoch 2", 0.80, 0.28),
        EpochScore("epoch 3", 0.82, 0.20),
    ]
    best, reason = suggest_epoch(scores)
    # Fidelity rescaled 0 / .91 / 1, flexibility 1 / .8 / 0: epoch 2 balances both.
    assert best.label == "epoch 2" and best.balance == pytest.approx((0.2 / 0.22 + 0.8) / 2)
    assert reason.startswith("epoch 2 has the best balance") and "Caution" not in reason
    tie = [EpochScore("epoch 1", 0.6, 0.3), EpochScore("epoch 2", 0.7, 0.2)]
    assert suggest_epoch(tie)[0].label == "epoch 1"  # equal balance: the earlier, more flexible file
    undertrained = [
        EpochScore("base model", 0.9, 0.3, is_base=True),
        EpochScore("epoch 1", 0.6, 0.3),
        EpochScore("epoch 2", 0.7, 0.2),
    ]
    assert "Caution: no epoch resembles the training images more than the base model" in suggest_epoch(undertrained)[1]


def test_lora_files_and_axes(tmp_path):
    lora = tmp_path / "run" / "lora"
    lora.mkdir(parents=True)
    for stem in ("x-epoch-010", "x-epoch-002", "x", "x-step-000050"):
        (lora / f"{stem}.safetensors").write_bytes(b"")
    assert [f.label for f in find_lora_files(str(tmp_path / "run"))] == ["epoch 2", "epoch 10"]
    assert [
        f.label for f in find_lora_files([str(lora / "x.safetensors"), str(lora / "x-step-000050.safetensors")])
    ] == ["x", "step 50"]
    with pytest.raises(LorafitError, match="no \\*-epoch-NNN.safetensors"):
        find_lora_files(str(tmp_path))
    values = {"epoch": [0, 1], "strength": [1.0], "prompt": [0], "seed": [1, 2], "cfg": [7.0], "lbw": [None]}
    with pytest.raises(LorafitError, match="seed has 2 values but is on no axis; set --x, --y or --z to seed"):
        check_axes("epoch", "strength", "prompt", values)
    with pytest.raises(LorafitError, match="must name different axes"):
        check_axes("epoch", "epoch", None, values)
    check_axes("epoch", "seed", None, values)
