"""A training step never makes the host wait for the GPU (counted on CPU by lorafit/bench/host_syncs.py)."""

from __future__ import annotations

import pytest
import torch
from training import train

from lorafit.bench.host_syncs import CountHostSyncs, HostSyncCounter
from lorafit.callbacks.metrics import TrainingMetrics
from lorafit.distributed.host_readback import HostReadback


def test_the_counter_sees_every_kind_of_host_sync_and_nothing_else():
    weight = torch.randn(4, 4)
    counter = HostSyncCounter(torch.device("cpu"))
    counter.mark_on_device(weight)
    host_step = torch.tensor(3.0)  # like an optimizer's step counter: made on the host
    readback = HostReadback()
    expected_loss = float((weight * 2).sum())
    with counter:
        loss = (weight * 2).sum()
        loss.item()  # read
        if (weight > 0).any():  # read (bool)
            pass
        f"{loss:.3f}"  # read (formatting)
        torch.tensor([1.0, 2.0], device="cpu")  # upload from host numbers
        weight[weight > 0]  # size depends on values
        torch.nonzero(weight)  # size depends on values
        # Not syncs: host values, device-side fills, copies read a step later.
        host_step.item()
        float(torch.tensor(2.0) * 3)
        torch.zeros(3, device="cpu").fill_(2.0)
        readback.push(loss, "step 0")
        assert readback.collect() == [([pytest.approx(expected_loss)], "step 0")]
    kinds = sorted(site.split(" at ")[0] for site in counter.sites.elements())
    assert kinds == ["__bool__", "__format__", "__getitem__", "item", "nonzero", "tensor"], counter.sites


def test_the_counter_sees_barriers(tmp_path):
    """A barrier waits for the GPU under NCCL; Lightning's sync_dist calls one before each all-reduce."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        counter = HostSyncCounter(torch.device("cpu"))
        with counter:
            dist.barrier()
        assert [site.split(" at ")[0] for site in counter.sites] == ["barrier"]
        dist.barrier()  # unwrapped again: not counted
        assert counter.count == 1
    finally:
        dist.destroy_process_group()


def test_host_readback_returns_values_in_order_and_keeps_the_newest():
    readback = HostReadback()
    for step in range(3):
        readback.push(torch.tensor([float(step), step * 10.0]), f"step {step}")
    assert readback.collect(keep=1) == [([0.0, 0.0], "step 0"), ([1.0, 10.0], "step 1")]
    assert len(readback) == 1
    assert readback.collect() == [([2.0, 20.0], "step 2")]


RECIPES = {
    "sdxl-defaults": ("sdxl", {}),
    # Every per-step option that draws or weights something, text-encoder training, accumulation,
    # clipping and a warmup schedule: none of them may read a value on the host.
    "sd1-full-recipe": (
        "sd1",
        dict(
            train_text_encoder=True,
            min_snr_gamma=5.0,
            noise_offset=0.05,
            noise_offset_random_strength=True,
            multires_noise_iterations=4,
            ip_noise_gamma=0.1,
            ip_noise_gamma_random_strength=True,
            loss_type="huber",
            lr_scheduler="cosine_with_restarts",
            lr_warmup_steps=2,
            min_timestep=100,
            max_timestep=900,
            debiased_estimation_loss=True,
            trainer_kwargs={"accumulate_grad_batches": 2, "gradient_clip_val": 1.0},
        ),
    ),
    "sdxl-dora": ("sdxl", dict(network_type="dora")),
    # The teaching methods of docs/teaching-methods.md: each adds work to the step, none a wait.
    "sd1-ema": ("sd1", dict(train_text_encoder=True, callbacks=["ema"])),
    "sdxl-masked": ("sdxl", dict(data="masked_data", loss={"mask_floor": 0.1, "mask_normalize": True})),
    "sdxl-prior": (
        "sdxl",
        dict(train_text_encoder=True, prior={"weight": 1.0, "class_word": "dog", "trigger": "ohwx"}),
    ),
    # Pivotal tuning: the new token's rows looked up on the device, frozen after 2 steps by dropping grads.
    "sdxl-pivotal": ("sdxl", dict(embedding={"token": "ohwx", "vectors": 2, "freeze_after": 2})),
    "sd1-slider": (  # the LoRA at +1 and -1 and an anchor each step
        "sd1",
        dict(train_text_encoder=True, slider={"positive": "a white star", "negative": "a black star", "anchor": "dog"}),
    ),
    "sd1-slider-pairs": ("sd1", dict(train_text_encoder=True, slider={"image_pairs": True})),
}


def _callbacks(names: list[str]) -> list:
    from lorafit.callbacks.ema import AdapterEMA

    made = {"ema": lambda: AdapterEMA(decay=0.99)}
    return [made[name]() for name in names]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_training_step_never_waits_for_the_gpu(recipe, tiny_models, demo_data, tmp_path, request):
    family, kwargs = RECIPES[recipe]
    kwargs = dict(kwargs)
    data = request.getfixturevalue(kwargs.pop("data")) if "data" in kwargs else demo_data
    # What `lorafit fit` runs each step: progress bar, training curves, loggers on their own schedule.
    trainer_kwargs = {"enable_progress_bar": True, "log_every_n_steps": 50, **kwargs.pop("trainer_kwargs", {})}
    extra = _callbacks(kwargs.pop("callbacks", []))
    count = CountHostSyncs(first=1, last=4)  # the demo data's first epoch has 10 steps at batch 1
    trainer, _ = train(
        tiny_models[family],
        data,
        tmp_path,
        max_epochs=1,
        max_steps=6,
        batch_size=1,
        trainer_kwargs=trainer_kwargs,
        callbacks=[TrainingMetrics(), *extra, count],
        **kwargs,
    )
    assert trainer.current_epoch == 0 or trainer.global_step == 6
    assert count.per_step == 0, dict(count.counter.sites)


def test_skipping_nonfinite_losses_costs_one_read_per_step(tiny_models, demo_data, tmp_path):
    """``nonfinite_loss: skip`` must decide before the backward pass: the one sync the docs promise."""
    count = CountHostSyncs(first=1, last=4)
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_epochs=1,
        max_steps=6,
        batch_size=1,
        trainer_kwargs={"enable_progress_bar": True},
        callbacks=[TrainingMetrics(), count],
        nonfinite_loss="skip",
    )
    assert count.per_step == 1
    assert list(count.lorafit_sites()) == [next(iter(count.counter.sites))]
    assert "nonfinite.py" in next(iter(count.counter.sites))
