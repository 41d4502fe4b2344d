"""CPU DDP (gloo, 2 processes) with the real `lorafit fit`: every family trains, logs once, exports once,
and with ``data.global_batch`` ends with the LoRA one process trains with twice the batch.

Text-encoder LoRA layers after the hidden state the UNet reads (SDXL's CLIP-L last layer, clip
skip) get no gradient; DDP stops on such parameters unless they are frozen, which is tested here
too.

Tolerance: the runs compute the same sums in a different order (two half-batch UNet calls and a
gloo all-reduce of their gradients, against one full-batch call). In float32 that rounding alone
moves the final weights by up to 2e-7 (SD1) and 7e-5 (SDXL) after 10 AdamW steps (Adam divides by
the root of the near-zero early gradients of the lora_down weights, amplifying a few ulp):
too close to what a small real difference would do for a sharp test. So the test trains in
float64 (`64-true`), where rounding is ~1e-16: the float32 LoRA files written by the two runs are
then bit-identical (measured), and the test allows 1e-7. The control run without global batches differs by ~1.6e-2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import demo_fit_args, lora_file, max_abs_difference, run_lorafit, tensorboard_scalars

from lorafit.training.module import LoraDiffusionModule

pytestmark = pytest.mark.slow  # subprocesses: DDP ranks, SLURM jobs, a browser, killed trainings

# Both train the text encoder(s), whose unread last layers (SD1 with clip skip 2, SDXL's CLIP-L)
# must not stop DDP.
FAMILY_ARGS = {"sd1": ["--model.clip_skip", "2"], "sdxl": [], "flux": []}
# Two epochs of the 4 demo images x 5 repeats (demo_data), no sample images (not under test here).
COMMON = [
    "--trainer.max_epochs",
    "2",
    "--trainer.precision",
    "64-true",
    "--samples.prompts",
    "[]",
    "--export.name",
    "ddp",
    "--data.resolution",
    "64",
    "--data.min_bucket_reso",
    "64",
    "--data.max_bucket_reso",
    "128",
    "--model.rank",
    "4",
]
TOLERANCE = 1e-7
# Short two-rank CPU runs (the step count is each test's): COMMON without its epoch count.
TWO_RANKS_BATCH_1 = [*COMMON[2:], "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "1"]


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_two_ddp_processes_equal_one_process_with_twice_the_batch(family, tiny_models, demo_data, tmp_path):
    def fit(root, *args):
        result = run_lorafit(*demo_fit_args(tiny_models[family], demo_data, root, *FAMILY_ARGS[family], *COMMON, *args))
        assert result.returncode == 0, result.stderr[-3000:]
        weights = lora_file(root, "ddp")
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
        return weights

    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2"]
    two = fit(tmp_path / "ddp", *ddp, "--data.global_batch", "true")
    one = fit(tmp_path / "one", "--data.batch_size", "4")
    # Logs come from rank 0 only, and the logged loss is the global batch's mean (sync_dist).
    assert len(list((tmp_path / "ddp").rglob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(tmp_path / "ddp", "loss/current")
    assert max_abs_difference(two, one) < TOLERANCE
    if family == "sd1":  # Control (one family is enough): ranks reading their own shards train other batches.
        assert max_abs_difference(fit(tmp_path / "sharded", *ddp), one) > 1e-3


@pytest.mark.parametrize(
    "family,clip_skip,network_type",
    [("sd1", 1, "lora"), ("sd1", 2, "lora"), ("sdxl", 1, "lora"), ("sdxl", 1, "loha"), ("sd1", 2, "lokr")],
)
def test_exactly_the_text_encoder_layers_without_gradient_are_frozen(
    family, clip_skip, network_type, tiny_models, demo_data
):
    """The frozen set is what autograd says cannot reach the loss (else DDP would stop on them)."""
    from training import tiny_batch

    from lorafit.networks.adapters import ADAPTER_NAME

    module = LoraDiffusionModule(
        model=tiny_models[family], rank=4, train_text_encoder=True, clip_skip=clip_skip, network_type=network_type
    )
    module.configure_model()
    lora = {name: p for name, p in module.text_encoders.named_parameters() if f".{ADAPTER_NAME}" in name}
    frozen = {name for name, p in lora.items() if not p.requires_grad}
    for p in lora.values():
        p.requires_grad_(True)
    for name, p in module.text_encoders.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would also zero A's gradient
            torch.nn.init.normal_(p.data, std=0.01)
    batch = tiny_batch(demo_data, 2)
    module.denoising_loss(batch, torch.Generator().manual_seed(0)).backward()
    no_gradient = {name for name, p in lora.items() if p.grad is None}
    assert frozen == no_gradient
    assert bool(frozen) == (family == "sdxl" or clip_skip > 1)


def test_a_ddp_step_never_makes_the_host_wait(tiny_models, demo_data, tmp_path):
    """What a SLURM job runs per step on each rank: the global-batch loss reduction and the requeue
    callback's agreement on the signal, with the progress bar on: no host sync (bench/host_syncs.py),
    in particular no barrier, which Lightning's sync_dist would add."""
    import json

    counter = {
        "class_path": "lorafit.bench.host_syncs.CountHostSyncs",
        "init_args": {"first": 1, "last": 4, "output": str(tmp_path / "syncs")},
    }
    result = run_lorafit(
        *demo_fit_args(
            tiny_models["sdxl"],
            demo_data,
            tmp_path / "run",
            *TWO_RANKS_BATCH_1,
            "--trainer.max_steps",
            "5",
            "--trainer.log_every_n_steps",
            "50",
            "--trainer.enable_progress_bar",
            "true",
            "--requeue.signal",
            "SIGUSR1",
            f"--trainer.callbacks+={json.dumps(counter)}",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        counted = json.loads((tmp_path / f"syncs.rank{rank}.json").read_text())
        assert counted["per_step"] == 0, counted["sites"]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tiny_models, demo_data, tmp_path):
    """Rank 0's loss is NaN at step 1; rank 1's is finite. Both stop by the guard at the same step with the
    one-line error (a rank stopping before its backward pass would leave the other in the gradient
    all-reduce until Lightning's process observer kills it, with no message)."""
    import json
    import os

    injection = {"class_path": "nan_injection.InfPixels", "init_args": {"step": 1, "rank": 0}}
    tests = Path(__file__).resolve().parent
    result = run_lorafit(
        *demo_fit_args(
            tiny_models["sd1"],
            demo_data,
            tmp_path / "run",
            *TWO_RANKS_BATCH_1,
            "--trainer.max_steps",
            "6",
            f"--trainer.callbacks+={json.dumps(injection)}",
        ),
        timeout=300,
        PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]),
    )
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("lorafit: error:"))
    # Each rank stops on its own check, at the same step: rank 0 on its loss, rank 1 on the weights the
    # all-reduced NaN gradient broke.
    assert len(errors) == 2, result.stderr[-3000:]
    assert errors[0].startswith("lorafit: error: LoRA weights became NaN/Inf after step 1 (epoch 0, batch 1")
    assert errors[1].startswith("lorafit: error: loss is nan at step 1 (epoch 0, batch 1")
    assert not list((tmp_path / "run" / "lora").rglob("*.safetensors")), "nothing exported from the broken step"
