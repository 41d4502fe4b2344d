"""Every optimizer trains the tiny SDXL model; every schedule's logged learning rates follow its formula."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from training import logged_metrics, train

from lorafit.errors import LorafitError
from lorafit.training.optim import optimizer_kwargs

STEPS = 8


def _lora_snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "optimizer, learning_rate, args, class_name",
    [
        ("AdamW", 1e-3, None, "AdamW"),
        ("AdamW8bit", 1e-3, None, "AdamW8bit"),
        ("Adafactor", 1e-3, {"scale_parameter": False, "relative_step": False, "warmup_init": False}, "Adafactor"),
        ("Adafactor", 1e-3, None, "Adafactor"),  # relative_step: Adafactor's own step size
        ("Prodigy", 1.0, {"d_coef": 2.0}, "Prodigy"),
        ("Lion", 1e-4, None, "Lion"),
        ("Lion8bit", 1e-4, None, "Lion8bit"),
    ],
)
def test_each_optimizer_trains_tiny_sdxl(optimizer, learning_rate, args, class_name, tiny_models, demo_data, tmp_path):
    trainer, module = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=3,
        batch_size=1,
        log_metrics=True,
        optimizer=optimizer,
        optimizer_args=args,
        learning_rate=learning_rate,
        train_text_encoder=True,
        text_encoder_lr=learning_rate if optimizer == "Prodigy" else learning_rate / 2,
    )
    used = trainer.optimizers[0]
    assert type(used).__name__ == class_name
    assert [g["name"] for g in used.param_groups] == ["unet", "text_encoder", "text_encoder_2"]
    lora = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert lora and all(torch.isfinite(p).all() for p in lora.values())
    # LoRA "up" matrices start at zero: any nonzero one was moved by the optimizer.
    for part in ("unet.", "text_encoders.0.", "text_encoders.1."):
        ups = [p for n, p in lora.items() if n.startswith(part) and "lora_B" in n]
        assert any(p.abs().max() > 0 for p in ups), f"{optimizer} did not update {part}"
    rates = logged_metrics(tmp_path, "lr/unet")
    assert sorted(rates) == [0, 1, 2] and all(r > 0 for r in rates.values())
    assert (tmp_path / "lora" / "test.safetensors").is_file()


def test_prodigy_logs_its_adapted_rate_d_times_lr(tiny_models, demo_data, tmp_path):
    trainer, _ = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=3,
        batch_size=1,
        log_metrics=True,
        optimizer="Prodigy",
        learning_rate=0.5,
        optimizer_args={"d0": 1e-6},
    )
    rates = logged_metrics(tmp_path, "lr/unet")
    # d starts at d0 and never falls below it; the logged rate is d * lr, not lr.
    assert rates[0] == pytest.approx(0.5 * 1e-6)
    assert all(rate >= 0.5 * 1e-6 * (1 - 1e-6) for rate in rates.values())
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == 0.5 and group["d"] >= 1e-6


def test_relative_step_adafactor_logs_its_own_step_size(tiny_models, demo_data, tmp_path):
    _, module = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=2,
        batch_size=1,
        log_metrics=True,
        optimizer="Adafactor",
        learning_rate=1e-4,
        lr_scheduler="cosine",
    )
    rates = logged_metrics(tmp_path, "lr/unet")
    first = next(p for p in module.unet.parameters() if p.requires_grad)
    # Adafactor's relative step at step 2: min(1e-2, 1/sqrt(2)) times the weight's RMS (scale_parameter).
    # The logged value for step 1 used the weight as it was before step 2; compare loosely.
    rms = first.detach().pow(2).mean().sqrt().item()
    assert rates[1] == pytest.approx(1e-2 * max(1e-3, rms), rel=0.05)
    assert rates[0] != pytest.approx(1e-4)


def _expected_lr(
    schedule: str,
    step: int,
    base: float,
    warmup: int,
    total: int,
    cycles: int = 1,
    power: float = 1.0,
    lr_init: float = 1e-3,
) -> float:
    """The schedules written out (transformers/diffusers definitions, as kohya uses them)."""
    if schedule == "constant":
        return base
    if step < warmup:
        return base * step / warmup
    if schedule == "constant_with_warmup":
        return base
    progress = (step - warmup) / (total - warmup)
    if schedule == "linear":
        return base * max(0.0, (total - step) / (total - warmup))
    if schedule == "cosine":  # half a cosine wave from 1 down to 0
        return base * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "cosine_with_restarts":
        return base * max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if schedule == "polynomial":  # decays lr_init to lr_end = 1e-7; other groups scale with it
        lr_end = 1e-7
        return base * ((lr_init - lr_end) * (1 - progress) ** power + lr_end) / lr_init
    raise AssertionError(schedule)


@pytest.mark.parametrize(
    "schedule, warmup, kwargs",
    [
        ("constant", 0, {}),
        ("constant_with_warmup", 3, {}),
        ("linear", 2, {}),
        ("cosine", 0.25, {}),  # a ratio: 25% of 8 steps = 2 warmup steps
        ("cosine_with_restarts", 1, {"lr_scheduler_num_cycles": 2}),
        ("polynomial", 2, {"lr_scheduler_power": 2.0}),
    ],
)
def test_logged_learning_rates_follow_the_schedule(schedule, warmup, kwargs, tiny_models, demo_data, tmp_path):
    base, text_base = 1e-3, 4e-4
    train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=STEPS,
        batch_size=1,
        log_metrics=True,
        learning_rate=base,
        lr_scheduler=schedule,
        lr_warmup_steps=warmup,
        train_text_encoder=True,
        text_encoder_lr=text_base,
        **kwargs,
    )
    warmup_steps = int(warmup * STEPS) if warmup < 1 else int(warmup)
    cycles = kwargs.get("lr_scheduler_num_cycles", 1)
    power = kwargs.get("lr_scheduler_power", 1.0)
    unet = logged_metrics(tmp_path, "lr/unet")
    text = logged_metrics(tmp_path, "lr/textencoder")
    text2 = logged_metrics(tmp_path, "lr/textencoder2")
    assert sorted(unet) == list(range(STEPS)), "one learning-rate value per optimizer step"
    for step in (0, 1, 2, 3, 5, 7):
        assert unet[step] == pytest.approx(
            _expected_lr(schedule, step, base, warmup_steps, STEPS, cycles, power), rel=1e-5, abs=1e-12
        ), (schedule, step)
        assert text[step] == pytest.approx(
            _expected_lr(schedule, step, text_base, warmup_steps, STEPS, cycles, power), rel=1e-5, abs=1e-12
        ), (schedule, step)
        assert text2[step] == pytest.approx(text[step]), "text_encoder_2_lr defaults to text_encoder_lr"
    if schedule != "constant":
        assert len({round(v, 12) for v in unet.values()}) > 1, "the schedule should change the rate"


def test_gradient_accumulation_steps_the_schedule_per_optimizer_step(tiny_models, demo_data, tmp_path):
    trainer, _ = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=4,
        batch_size=1,
        log_metrics=True,
        learning_rate=1e-3,
        lr_scheduler="linear",
        trainer_kwargs={"accumulate_grad_batches": 2},
    )
    assert trainer.global_step == 4 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 8
    unet = logged_metrics(tmp_path, "lr/unet")
    assert [round(unet[s] / 1e-3, 6) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_frozen_parts_get_no_lora_and_exports_match(tiny_models, demo_data, tmp_path):
    """lr 0 = frozen: no adapter on that part, nothing of it in the optimizer, checkpoint or files."""
    trainer, module = train(
        tiny_models["sdxl"],
        demo_data,
        tmp_path,
        max_epochs=10,
        max_steps=2,
        batch_size=1,
        log_metrics=True,
        unet_lr=0.0,
        train_text_encoder=True,
        text_encoder_lr=1e-3,
        text_encoder_2_lr=0.0,
    )
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["text_encoder"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("text_encoders.0.") and "lora_" in n for n in trainable)
    assert not any("lora_" in n for n, _ in module.unet.named_parameters())
    assert not any("lora_" in n for n, _ in module.text_encoders[1].named_parameters())
    with safe_open(str(tmp_path / "lora" / "test.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("lora_te1_") for k in keys)
    assert metadata["ss_unet_lr"] == "0.0" and metadata["ss_network_train_unet_only"] == "False"
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # Every adapter weight and nothing else: the trained ones, and the frozen ones of CLIP-L's unread
    # last layer (kept so a resumed run exports exactly what an uninterrupted one would).
    assert trainable < set(saved) == {n for n, _ in module.named_parameters() if "lora_" in n}
    assert set(logged_metrics(tmp_path, "lr/textencoder")) == {0, 1}
    with open(tmp_path / "metrics.csv") as handle:
        assert "lr/unet" not in handle.readline()


def test_recipe_is_recorded_in_kohya_metadata(tiny_models, demo_data, tmp_path):
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_steps=2,
        optimizer="AdamW8bit",
        weight_decay=0.1,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        noise_offset=0.05,
        min_snr_gamma=5.0,
        trainer_kwargs={"gradient_clip_val": 1.0},
    )
    with safe_open(str(tmp_path / "lora" / "test.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_optimizer"] == "bitsandbytes.optim.AdamW8bit(weight_decay=0.1)"
    assert metadata["ss_lr_scheduler"] == "cosine" and metadata["ss_lr_warmup_steps"] == "1"
    assert metadata["ss_noise_offset"] == "0.05" and metadata["ss_min_snr_gamma"] == "5.0"
    assert metadata["ss_max_grad_norm"] == "1.0" and metadata["ss_loss_type"] == "l2"


def test_bad_optimizer_settings_get_one_line(tiny_models, demo_data, tmp_path):
    from lorafit.training.module import LoraDiffusionModule

    with pytest.raises(LorafitError, match="model.betas and model.optimizer_args.betas"):
        optimizer_kwargs("AdamW", None, (0.9, 0.99), {"betas": (0.8, 0.9)})
    with pytest.raises(LorafitError, match="Adafactor has no betas"):
        LoraDiffusionModule(model=tiny_models["sd1"], optimizer="Adafactor", betas=(0.9, 0.99))
    with pytest.raises(LorafitError, match="model.optimizer_args: AdamW rejected"):
        train(tiny_models["sd1"], demo_data, tmp_path, max_steps=1, optimizer_args={"momentum": 0.9})
    with pytest.raises(LorafitError, match="constant scheduler has no warmup"):
        train(tiny_models["sd1"], demo_data, tmp_path, max_steps=1, lr_warmup_steps=10)
    with pytest.raises(LorafitError, match="Prodigy adapts one learning rate"):
        train(
            tiny_models["sd1"],
            demo_data,
            tmp_path,
            max_steps=1,
            optimizer="Prodigy",
            learning_rate=1.0,
            train_text_encoder=True,
            text_encoder_lr=0.5,
        )
    with pytest.raises(LorafitError, match="every learning rate is 0"):
        train(tiny_models["sd1"], demo_data, tmp_path, max_steps=1, unet_lr=0.0)


def test_missing_optional_optimizer_package_names_the_extra(monkeypatch):
    import sys

    from lorafit.training.optim import optimizer_class

    for module, name, extra in (
        ("prodigyopt", "Prodigy", "prodigy"),
        ("lion_pytorch", "Lion", "lion"),
        ("bitsandbytes", "AdamW8bit", "bnb"),
    ):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
        if module == "bitsandbytes":
            monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
        with pytest.raises(LorafitError, match=rf"model.optimizer: {name} needs .*pip install lorafit\[{extra}\]"):
            optimizer_class(name)


def test_adamw_runs_fused_unless_the_user_chose_and_updates_the_same():
    """AdamW takes torch's fused kernel by default (one pass over the LoRA's many small tensors instead
    of a Python loop on the CPU); optimizer_args {foreach: ...} or {fused: ...} are kept as given."""
    from lorafit.training.optim import build_optimizer

    torch.manual_seed(0)
    shapes = [(8, 32), (32, 8), (4, 4, 3, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    results = {}
    for args in ({}, {"foreach": False}, {"fused": False}):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        kwargs = optimizer_kwargs("AdamW", 0.01, None, args)
        optimizer = build_optimizer("AdamW", [{"name": "unet", "lr": 1e-2, "params": params}], 1e-2, kwargs)
        assert bool(optimizer.param_groups[0]["fused"]) is (not args)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
        results[str(args)] = params
    for name, params in results.items():
        for fused, other in zip(results["{}"], params):
            torch.testing.assert_close(fused, other, rtol=1e-6, atol=1e-7, msg=name)
