"""The teaching methods of docs/teaching-methods.md under CPU DDP (gloo, 2 processes, the real `lorafit fit`):
with ``data.global_batch`` two processes write exactly the files one process writes with twice the
batch, for each method's own files too (EMA twin, embeddings). Trained in float64 as tests/test_ddp.py
explains (there, the same comparison for plain LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import demo_fit_args, max_abs_difference, run_lorafit
from safetensors.torch import load_file
from test_ddp import COMMON, TOLERANCE

pytestmark = pytest.mark.slow  # subprocesses: two DDP ranks and a one-process run per method

# method -> (extra `lorafit fit` arguments, the files to compare relative to the run's lora/ folder,
# the data fixture, the family). The demo config trains the text encoder(s) too.
METHODS = {
    "ema": (["--ema.decay", "0.9"], ["ddp.safetensors", "ema/ddp.safetensors"], "demo_data", "sd1"),
    "masked": (["--model.loss.mask_floor", "0.1"], ["ddp.safetensors"], "masked_data", "sd1"),
    # SDXL: the prior switches adapters off and on each step; CLIP-L's unread last layer must stay frozen.
    "prior": (
        ["--model.prior.weight", "0.5", "--model.prior.class_word", "shape", "--model.prior.trigger", "ohwx"],
        ["ddp.safetensors"],
        "demo_data",
        "sdxl",
    ),
    # Pivotal tuning on SDXL: the LoRA with its bundled embedding, and the embedding file of both encoders.
    "pivotal": (
        ["--model.embedding.token", "ohwx", "--model.embedding.init_word", "star", "--model.embedding.vectors", "2"],
        ["ddp.safetensors", "embeddings/ohwx.safetensors"],
        "demo_data",
        "sdxl",
    ),
    # The LoRA at +1 and -1 in one step, with the text encoder's LoRA (the demo config trains it).
    "slider": (
        ["--model.slider.positive", "a white star", "--model.slider.negative", "a black star"],
        ["ddp.safetensors"],
        "demo_data",
        "sd1",
    ),
    # Each picture's halves at +1 and -1 with one noise draw, which the global batch must share.
    "slider-pairs": (["--model.slider.image_pairs", "true"], ["ddp.safetensors"], "demo_data", "sd1"),
}


@pytest.mark.parametrize("method", METHODS)
def test_two_ddp_processes_equal_one_process_with_twice_the_batch(method, tiny_models, tmp_path, request):
    extra, files, data, family = METHODS[method]
    data = request.getfixturevalue(data)

    def fit(root: Path, *args: str) -> dict[str, dict[str, torch.Tensor]]:
        result = run_lorafit(*demo_fit_args(tiny_models[family], data, root, *COMMON, *extra, *args))
        assert result.returncode == 0, result.stderr[-3000:]
        return {name: load_file(str(root / "lora" / name)) for name in files}

    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2"]
    two = fit(tmp_path / "ddp", *ddp, "--data.global_batch", "true")
    one = fit(tmp_path / "one", "--data.batch_size", "4")
    for name in files:
        assert max_abs_difference(two[name], one[name]) < TOLERANCE, name
