"""CPU DDP (gloo, 2 processes) trains what one process with twice the batch trains.

Why the two agree: the DistributedSampler deals each step's global batch out round-robin, every
sample draws its latent, noise and timestep from a generator seeded by its place in that global
batch (LoraDiffusionModule.sample_generators), each rank's loss is the mean over its half and DDP
averages the gradients, which is the mean over the whole batch. What remains is float rounding:
a UNet on 2 images instead of 4, and a gradient sum in another order, then amplified a little by
Adam's normalisation.

Tolerance, after 5 AdamW steps at lr 1e-3 (a step moves a weight by up to ~1e-3): every LoRA
weight within DDP_MAX_DIFFERENCE = 1e-4 of the 1-process run and the mean |difference| at most
DDP_MEAN_DIFFERENCE = 1e-6, while training moved lora_up (which starts at 0) by ~2e-3 on average.
Measured (2026-11, torch 2.13 CPU): max 1.6e-6 / mean 2.4e-9 for SD1, max 2.8e-5 / mean 1.2e-8 for
SDXL; the largest differences are a handful of weights whose gradient is near zero, where Adam's
m / sqrt(v) turns rounding noise into a visible step. With noise seeded per rank instead (the
module before this test existed) the SD1 run differs by max 9.1e-3 / mean 1.5e-3 and fails.
"""

from __future__ import annotations

import pytest
import torch
from cli_runs import demo_fit_args, lora_file, run_lorafit, tensorboard_scalars

from lorafit.module import LoraDiffusionModule

DDP_MAX_DIFFERENCE = 1e-4
DDP_MEAN_DIFFERENCE = 1e-6
# Both train the text encoder(s), whose unread last layers (SD1 with clip skip 2, SDXL's CLIP-L)
# must not stop DDP.
FAMILY_ARGS = {"sd1": ["--model.clip_skip", "2"], "sdxl": []}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_ddp_processes_match_one_process_with_twice_the_batch(family, tiny_models, demo_data, tmp_path):
    args = [*FAMILY_ARGS[family], "--trainer.max_epochs", "1"]
    one = run_lorafit(*demo_fit_args(tiny_models[family], demo_data, tmp_path / "one", *args,
                                     "--data.batch_size", "4"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_lorafit(*demo_fit_args(tiny_models[family], demo_data, tmp_path / "two", *args,
                                     "--data.batch_size", "2", "--trainer.devices", "2",
                                     "--trainer.strategy", "ddp"))
    assert two.returncode == 0, two.stderr[-3000:]
    # Each process loads the base model once: two processes ran.
    assert two.stderr.count("lorafit.models: loaded") == 2 and one.stderr.count("lorafit.models: loaded") == 1

    single, ddp = lora_file(tmp_path / "one"), lora_file(tmp_path / "two")
    assert single.keys() == ddp.keys()
    difference = torch.cat([(single[k] - ddp[k]).abs().flatten() for k in single])
    moved = torch.cat([v.abs().flatten() for k, v in single.items() if "lora_up" in k]).mean().item()
    print(f"{family}: 2 processes vs 1: max |difference| {difference.max():.2e}, mean {difference.mean():.2e}; "
          f"mean |lora_up| {moved:.2e}")
    assert difference.max() <= DDP_MAX_DIFFERENCE and difference.mean() <= DDP_MEAN_DIFFERENCE
    assert moved > 1000 * DDP_MEAN_DIFFERENCE, "training barely moved the weights; the comparison is empty"

    # Exports are written once, by rank 0, and completely.
    assert two.stderr.count("saved LoRA") == one.stderr.count("saved LoRA") == 4
    names = lambda root: sorted(p.relative_to(root).as_posix() for p in (root / "lora").rglob("*"))  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")
    # Logs come from rank 0 only, and the logged loss is the whole global batch's (sync_dist).
    assert len(list((tmp_path / "two").rglob("events.out.tfevents.*"))) == 1
    losses_one = tensorboard_scalars(tmp_path / "one", "loss/current")
    losses_two = tensorboard_scalars(tmp_path / "two", "loss/current")
    assert sorted(losses_two) == sorted(losses_one) and len(losses_one) == 5
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step


@pytest.mark.parametrize("family,clip_skip", [("sd1", 1), ("sd1", 2), ("sdxl", 1)])
def test_exactly_the_text_encoder_layers_without_gradient_are_frozen(family, clip_skip, tiny_models, demo_data):
    """The frozen set is what autograd says cannot reach the loss (else DDP would stop on them)."""
    from torch.utils.data import DataLoader

    from lorafit.data.folder import FolderDataModule, collate_folder_batch

    module = LoraDiffusionModule(model=tiny_models[family], rank=4, train_text_encoder=True, clip_skip=clip_skip)
    module.configure_model()
    lora = {name: p for name, p in module.text_encoders.named_parameters() if "lora_" in name}
    frozen = {name for name, p in lora.items() if not p.requires_grad}
    for p in lora.values():
        p.requires_grad_(True)
    for name, p in module.text_encoders.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would also zero A's gradient
            torch.nn.init.normal_(p.data, std=0.01)
    data = FolderDataModule(train_dir=demo_data, resolution=64, batch_size=2)
    batch = next(iter(DataLoader(data.dataset, batch_size=2, collate_fn=collate_folder_batch)))
    module.denoising_loss(batch, [torch.Generator().manual_seed(i) for i in range(2)]).backward()
    no_gradient = {name for name, p in lora.items() if p.grad is None}
    assert frozen == no_gradient
    assert bool(frozen) == (family == "sdxl" or clip_skip > 1)
