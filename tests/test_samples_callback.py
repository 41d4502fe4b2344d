"""Sample images and training curves during a tiny-SDXL fit: PNGs, TensorBoard events, a W&B offline run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training import train

from lorafit.callbacks.metrics import TrainingMetrics
from lorafit.callbacks.samples import SampleImages
from lorafit.inference.render_options import RenderOptions

PROMPTS = ["ohwx star, a yellow star --s 2 --d 5", "a photo of a cat --n blurry --s 2 --ss ddim"]


def _lora_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k}


def _halves(path) -> tuple[np.ndarray, np.ndarray]:
    """The base-model and LoRA cells of a compare_base sample (64 px cells; labels above, 4 px gaps)."""
    image = np.asarray(Image.open(path).convert("RGB"))
    top = image.shape[0] - 4 - 64
    return image[top : top + 64, 4:68], image[top : top + 64, 72:136]


@pytest.fixture(scope="module")
def tensorboard_run(tiny_models, demo_data, tmp_path_factory):
    from lightning.pytorch.loggers import TensorBoardLogger

    root = tmp_path_factory.mktemp("samples-tb")
    samples = SampleImages(prompts=PROMPTS, render=RenderOptions(steps=2), before_training=True, compare_base=True)
    logger = TensorBoardLogger(save_dir=str(root), name="tb", version=0)
    common = dict(
        max_epochs=2,
        learning_rate=1e-2,
        data_kwargs={"repeats": 1, "val_dir": demo_data},
        trainer_kwargs={"log_every_n_steps": 1},
    )
    _trainer, module = train(
        tiny_models["sdxl"], demo_data, root, callbacks=[samples, TrainingMetrics()], logger=logger, **common
    )
    _, plain = train(tiny_models["sdxl"], demo_data, tmp_path_factory.mktemp("no-samples"), **common)
    return root, samples, module, plain


def test_samples_written_every_epoch_with_parameters(tensorboard_run):
    root, _samples, _, _ = tensorboard_run
    names = sorted(p.name for p in (root / "samples").glob("*.png"))
    assert names == [f"epoch-{e:03d}_step-{s:06d}_{i:02d}.png" for e, s in ((0, 0), (1, 2), (2, 4)) for i in (0, 1)]
    parameters = Image.open(root / "samples" / "epoch-002_step-000004_01.png").text["parameters"]
    assert parameters.startswith("a photo of a cat <lora:test-epoch-002:1>\nNegative prompt: blurry\n")
    assert "Steps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64" in parameters  # seed 0 + index 1
    assert "Seed: 5," in Image.open(root / "samples" / "epoch-001_step-000002_00.png").text["parameters"]


def test_the_lora_half_is_the_exported_file_as_generate_draws_it(tensorboard_run, tiny_models, tmp_path):
    """What a user compares: the sample of epoch 2 is `lorafit generate` with lora/test-epoch-002 at strength 1."""
    from lorafit.inference.generate import generate
    from lorafit.inference.png_info import short_hash
    from lorafit.inference.render_options import BaseModelOptions

    root = tensorboard_run[0]
    sample = root / "samples" / "epoch-002_step-000004_00.png"
    lora = root / "lora" / "test-epoch-002.safetensors"
    parameters = Image.open(sample).text["parameters"]
    assert parameters.startswith("ohwx star, a yellow star <lora:test-epoch-002:1>\n")
    assert f'Lora hashes: "test-epoch-002: {short_hash(lora)}"' in parameters and "Model: " in parameters
    assert "Sample layout: left base model, right LoRA" in parameters
    (drawn,) = generate(
        tiny_models["sdxl"],
        PROMPTS[0],
        lora=[str(lora)],
        render=RenderOptions(steps=20),  # the prompt's own --s 2 and --d 5 win, as in the sample
        base=BaseModelOptions(device="cpu"),
        out=str(tmp_path),
    )
    assert np.array_equal(np.asarray(Image.open(drawn).convert("RGB")), _halves(sample)[1])
    # Before training there is no file yet: the tag still names the run's LoRA, without a hash.
    first = Image.open(root / "samples" / "epoch-000_step-000000_00.png").text["parameters"]
    assert "<lora:test-epoch-000:1>" in first and "Lora hashes" not in first


def test_base_and_lora_side_by_side(tensorboard_run):
    root, _, _, _ = tensorboard_run
    before_base, before_lora = _halves(root / "samples" / "epoch-000_step-000000_00.png")
    after_base, after_lora = _halves(root / "samples" / "epoch-002_step-000004_00.png")
    # A fresh LoRA (up weights zero) is the base model; the base half never changes; training does.
    assert np.array_equal(before_base, before_lora)
    assert np.array_equal(before_base, after_base)
    assert np.abs(after_lora.astype(int) - after_base).max() > 0


def test_sampling_leaves_training_untouched(tensorboard_run):
    _, _, module, plain = tensorboard_run
    sampled, reference = _lora_state(module), _lora_state(plain)
    assert sampled.keys() == reference.keys() and sampled
    assert all(torch.equal(sampled[k], reference[k]) for k in reference)
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)
    modes = {name: m.training for name, m in module.named_modules()}
    assert modes == {name: m.training for name, m in plain.named_modules()}


def test_tensorboard_images_and_curves(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _, _ = tensorboard_run
    events = EventAccumulator(str(root / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"samples/00", "samples/01"} <= set(tags["images"])
    assert [e.step for e in events.Images("samples/00")] == [0, 2, 4]
    first = events.Images("samples/00")[0]
    assert (first.width, first.height) == Image.open(root / "samples" / "epoch-000_step-000000_00.png").size
    for tag in ("loss/current", "loss/average", "loss/epoch", "loss/validation", "perf/images_per_sec"):
        assert tag in tags["scalars"], tag
    current = [e.value for e in events.Scalars("loss/current")]
    epochs = [e.value for e in events.Scalars("loss/epoch")]
    assert len(current) == 4 and len(epochs) == 2
    assert epochs[0] == pytest.approx(np.mean(current[:2]), rel=1e-5)
    assert epochs[1] == pytest.approx(np.mean(current[2:]), rel=1e-5)
    # Window = one epoch (2 steps): the moving average at step 3 spans steps 2 and 3.
    average = [e.value for e in events.Scalars("loss/average")]
    assert average[3] == pytest.approx(np.mean(current[2:4]), rel=1e-5)
    assert all(e.value > 0 for e in events.Scalars("perf/images_per_sec"))


def test_validation_noise_is_fixed_per_sample(tiny_models, demo_data):
    from training import tiny_batch

    from lorafit.data.sample_transform import collate
    from lorafit.training.module import LoraDiffusionModule

    module = LoraDiffusionModule(model=tiny_models["sdxl"], rank=4)
    module.configure_model()
    batch = tiny_batch(demo_data, 3)
    samples = [
        {
            "pixel_values": batch["pixel_values"][i],
            "caption": batch["captions"][i],
            "original_size": batch["original_size"][i].tolist(),
            "crop_top_left": batch["crop_top_left"][i].tolist(),
            "is_reg": False,
            "key": batch["keys"][i],
        }
        for i in range(3)
    ]
    pair = collate(samples[:2])
    reversed_pair = collate([samples[2], samples[1]])
    noise_a, steps_a, _ = module.fixed_noise(pair, batch_idx=0)
    noise_b, steps_b, _ = module.fixed_noise(reversed_pair, batch_idx=7)
    # The same image gets the same noise and timestep in another batch, position and batch index.
    assert torch.equal(noise_a[1], noise_b[1]) and steps_a[1] == steps_b[1]
    assert not torch.equal(noise_a[0], noise_b[0])


def test_wandb_offline_run_holds_images_and_config(tiny_models, demo_data, tmp_path, monkeypatch):
    import wandb  # the wandb extra; part of the dev dependencies, so CI runs this
    from lightning.pytorch.loggers import WandbLogger
    from wandb_records import run_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lorafit-test")
    samples = SampleImages(prompts=[PROMPTS[0]], render=RenderOptions(steps=2))
    try:
        train(
            tiny_models["sdxl"],
            demo_data,
            tmp_path,
            max_epochs=1,
            callbacks=[samples],
            logger=logger,
            data_kwargs={"repeats": 1},
        )
    finally:
        # Lightning leaves the run open. finish() returns before wandb's service process has
        # written the run file out; teardown() stops that process, which flushes it.
        logger.experiment.finish()
        wandb.teardown()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    records = run_records(run_dir)
    assert json.loads(records["config"]["network"])["rank"] == 4
    assert json.loads(records["config"]["model"]) == tiny_models["sdxl"]
    logged = [row for row in records["history"] if "samples/00/filenames" in row]
    assert len(logged) == 1
    assert json.loads(logged[0]["samples/00/captions"]) == ["ohwx star, a yellow star"]
    (media,) = json.loads(logged[0]["samples/00/filenames"])
    image = Image.open(run_dir / "files" / media)
    assert image.size == Image.open(samples.written[0]).size


def test_a_round_shares_images_out_equally_over_ranks():
    from lorafit.callbacks.sample_round import rank_share

    shares = [rank_share(7, rank, 3) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for share in shares for i in share) == list(range(7))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host/device moves need an accelerator")
def test_optimizer_state_and_gradients_leave_the_gpu_during_a_round_and_come_back_exactly():
    from lorafit.callbacks.sample_round import move_training_state, restore_training_state

    layer = torch.nn.Linear(256, 256).cuda()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(8, 256, device="cuda")).sum().backward()
    optimizer.step()
    layer(torch.randn(8, 256, device="cuda")).sum().backward()  # gradients of the next step, kept
    before = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}, layer.weight.grad.clone()
    allocated = torch.cuda.memory_allocated()
    moved = move_training_state([optimizer], torch.device("cpu"))
    # Two AdamW moments and a gradient per parameter, 4 bytes per value, left the GPU.
    assert allocated - torch.cuda.memory_allocated() >= 3 * 4 * (256 * 256 + 256)
    assert layer.weight.grad is None and optimizer.state[layer.weight]["exp_avg"].device.type == "cpu"
    restore_training_state(moved)
    assert all(torch.equal(optimizer.state[layer.weight][k], v) for k, v in before[0].items())
    assert torch.equal(layer.weight.grad, before[1]) and layer.weight.grad.device.type == "cuda"
