"""CPU DDP (gloo, 2 processes) with the real `lorafit fit`: every family trains, logs once, exports once.

Text-encoder LoRA layers after the hidden state the UNet reads (SDXL's CLIP-L last layer, clip
skip) get no gradient; DDP stops on such parameters unless they are frozen, which is tested here
too. (Equality with one process at twice the batch needs the DataModule to deal global batches;
see the data docs.)
"""

from __future__ import annotations

import pytest
import torch
from cli_runs import demo_fit_args, lora_file, run_lorafit, tensorboard_scalars

from lorafit.module import LoraDiffusionModule

# Both train the text encoder(s), whose unread last layers (SD1 with clip skip 2, SDXL's CLIP-L)
# must not stop DDP.
FAMILY_ARGS = {"sd1": ["--model.clip_skip", "2"], "sdxl": []}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_ddp_processes_train_and_export_once(family, tiny_models, demo_data, tmp_path):
    result = run_lorafit(*demo_fit_args(tiny_models[family], demo_data, tmp_path, *FAMILY_ARGS[family],
                                        "--trainer.max_epochs", "1", "--data.batch_size", "2",
                                        "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = lora_file(tmp_path)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    # Logs come from rank 0 only, and the logged loss is the global batch's mean (sync_dist).
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1
    assert tensorboard_scalars(tmp_path, "loss/current")


@pytest.mark.parametrize("family,clip_skip", [("sd1", 1), ("sd1", 2), ("sdxl", 1)])
def test_exactly_the_text_encoder_layers_without_gradient_are_frozen(family, clip_skip, tiny_models, demo_data):
    """The frozen set is what autograd says cannot reach the loss (else DDP would stop on them)."""
    from training import tiny_batch

    module = LoraDiffusionModule(model=tiny_models[family], rank=4, train_text_encoder=True, clip_skip=clip_skip)
    module.configure_model()
    lora = {name: p for name, p in module.text_encoders.named_parameters() if "lora_" in name}
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
