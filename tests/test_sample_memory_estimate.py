"""tools/estimate_sample_memory.py: the sampling round's memory rows add up, CPU-sized (1/8 width, 256 px)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from cli_runs import REPO, lorafit_env


@pytest.mark.slow
def test_the_round_leaves_out_exactly_the_text_encoders_and_the_training_state():
    result = subprocess.run(
        [sys.executable, "tools/estimate_sample_memory.py", "--width-divisor", "8", "--resolution", "256"],
        cwd=REPO,
        env=lorafit_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \| ([\d.]+) \|$", result.stdout, re.M)}
    before = rows["**round before: everything on the device**"]
    after = rows["**lorafit's round: state on the host, one frozen part at a time**"]
    text, state = rows["text encoders' weights (bf16)"], rows["LoRA gradients + adafactor state"]
    assert 0 < after < before and text > 0 and state > 0
    # The rows are rounded to 0.01 GiB: the difference is what the round keeps off the device.
    assert before - after == pytest.approx(text + state, abs=0.02)
    assert after >= rows["UNet + LoRA weights (bf16 / fp32)"] + rows["VAE weights (bf16)"] - 0.01
