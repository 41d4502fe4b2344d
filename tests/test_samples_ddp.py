"""Sample images under DDP: every rank draws its share of a round, rank 0 writes the whole round.

When rank 0 drew every image alone, the other ranks waited for it in the next gradient all-reduce
and a long round ran into the process group's timeout. Two real CPU ranks (gloo) here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.generate import generate
from lorafit.inference.render_options import BaseModelOptions, RenderOptions

PROBE = Path(__file__).with_name("ddp_samples_probe.py")
sys.path.insert(0, str(PROBE.parent))
from ddp_samples_probe import PROMPTS  # noqa: E402


def _cell(sheet: Image.Image, row: int, col: int, labels: tuple[list[str], list[str]], size: int) -> np.ndarray:
    # The same call the callback makes, on blank cells: where each cell of that sheet sits.
    blank = Image.new("RGB", (size, size))
    _, layout = make_sheet([[blank] * len(labels[0])] * len(labels[1]), *labels)
    x, y = layout.cell_origin(row, col)
    return np.asarray(sheet.convert("RGB"))[y : y + size, x : x + size]


@pytest.mark.slow
def test_each_rank_draws_its_share_and_rank_zero_writes_the_round(tiny_models, demo_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(PROBE), tiny_models["sd1"], demo_data, str(tmp_path)],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = [{tuple(item) for item in json.loads((tmp_path / f"rank{r}.json").read_text())} for r in (0, 1)]
    # Prompt i at seeds 0 + i and 1 + i: six images, three per rank, none drawn twice.
    everything = {(p, s + p) for p in range(3) for s in (0, 1)}
    assert drawn[0] | drawn[1] == everything and not drawn[0] & drawn[1]
    assert len(drawn[0]) == len(drawn[1]) == 3

    (lora,) = (tmp_path / "lora").glob("ddp-epoch-001.safetensors")
    sheets = sorted((tmp_path / "samples").glob("epoch-001_step-*.png"))
    assert [p.name[-6:] for p in sheets] == ["00.png", "01.png", "02.png"]  # rank 0 wrote one per prompt
    step = int(sheets[0].name.split("_step-")[1][:6])
    cpu = BaseModelOptions(device="cpu")
    for index, sheet_path in enumerate(sheets):
        sheet = Image.open(sheet_path)
        assert "<lora:ddp-epoch-001:1>" in sheet.text["parameters"]
        seeds = [index, index + 1]
        labels = ([f"seed {s}" for s in seeds], ["base model", f"LoRA, epoch 1 step {step}"])
        for col, seed in enumerate(seeds):
            # Whichever rank drew it, each cell is the image `generate` draws with that epoch's file.
            render = RenderOptions(steps=2, seed=seed)
            (with_lora,) = generate(
                tiny_models["sd1"], PROMPTS[index], lora=[str(lora)], render=render, base=cpu, out=str(tmp_path / "g")
            )
            (plain,) = generate(tiny_models["sd1"], PROMPTS[index], render=render, base=cpu, out=str(tmp_path / "b"))
            assert np.array_equal(_cell(sheet, 1, col, labels, 64), np.asarray(Image.open(with_lora).convert("RGB")))
            assert np.array_equal(_cell(sheet, 0, col, labels, 64), np.asarray(Image.open(plain).convert("RGB")))
