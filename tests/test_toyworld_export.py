"""An exported toy-world LoRA at strength 1 reproduces the training model's predictions exactly.

If export or loading lost strength (alpha, a module, the text encoder's part), a LoRA would look
weaker in every measurement than it trained. Here the demo's network (``target_preset: full``:
ResNet convolutions, attention, time embedding; the text encoder too) is trained a few steps on
the toy base with alpha != rank, exported by the training callback in both formats, loaded into a
fresh diffusers pipeline, and the pipeline's noise prediction (its own prompt encoding, then the
UNet) is compared with the training module's (the training step's text conditioning and UNet call).

Tolerance: none. On the CPU in float32 both sides run the same PEFT layers on the same weights
(the files are float32), so the predictions are bitwise equal; any difference is a bug.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lorafit.callbacks.export import LoraExport
from lorafit.data.datamodule import LoraDataModule
from lorafit.toyworld import evaluate as ev
from lorafit.toyworld.concept_data import write_concept_dataset
from lorafit.training.module import LoraDiffusionModule

CAPTIONS = ["a red ohwx on a blue background", "a green circle on a black background", ""]  # "" = CFG's branch
TIMESTEPS = [999, 500, 20]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-export")
    data = write_concept_dataset(root / "data", num_images=4, repeats=2, world_images=8)
    pl.seed_everything(0)
    module = LoraDiffusionModule(
        model=str(ev.BASE_DIR),
        rank=8,
        alpha=4.0,  # scale 0.5: a file that lost alpha would reload at scale 1
        target_preset="full",
        train_text_encoder=True,
        learning_rate=2e-2,  # a few steps must move the predictions well away from the base's
    )
    datamodule = LoraDataModule(
        train_dir=str(data), resolution=32, batch_size=4, min_bucket_reso=32, bucket_reso_steps=32
    )
    trainer = pl.Trainer(
        default_root_dir=str(root / "run"),
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoraExport(name="toy", every_n_epochs=0)],
    )
    trainer.fit(module, datamodule=datamodule)
    return module.eval(), root / "run" / "lora"


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(len(CAPTIONS), 8, 8, 8, generator=generator), torch.tensor(TIMESTEPS)


@torch.no_grad()
def _training_prediction(module) -> torch.Tensor:
    noisy, timesteps = _inputs()
    text = module.text_conditioning({"captions": CAPTIONS})
    step = module.step  # the training step's own call of the family's denoiser
    return step.family.predict(module.base, noisy, timesteps, text, {}, step.options)


@torch.no_grad()
def _pipeline_prediction(pipe) -> torch.Tensor:
    noisy, timesteps = _inputs()
    embeddings, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, do_classifier_free_guidance=False)
    return pipe.unet(noisy, timesteps, embeddings).sample


@pytest.mark.parametrize("loader", ["lorafit-kohya", "lorafit-diffusers", "diffusers-load_lora_weights"])
def test_exported_lora_at_strength_1_reproduces_the_training_model(trained, loader):
    module, lora = trained
    want = _training_prediction(module)
    pipe = ev.load_pipeline()
    base = _pipeline_prediction(pipe)
    if loader == "lorafit-kohya":
        ev.apply_lora(pipe, lora / "toy.safetensors", strength=1.0)
    elif loader == "lorafit-diffusers":
        ev.apply_lora(pipe, lora / "diffusers" / "toy.safetensors", strength=1.0)
    else:
        pipe.load_lora_weights(str(lora / "diffusers" / "toy.safetensors"))
    assert (base - want).abs().max() > 0.05, "training moved nothing; the comparison would prove nothing"
    got = _pipeline_prediction(pipe)
    assert torch.equal(got, want), f"max difference {(got - want).abs().max():.3g}"


def test_strength_scales_the_loaded_update_linearly(trained):
    """Strength s gives base + s * (trained - base) for a linear layer's output: the 0.75 column of the
    benchmark is a 0.75-strength LoRA, not something else."""
    _module, lora = trained
    pipe = ev.load_pipeline()
    layer = pipe.unet.conv_in
    x = _inputs()[0]
    with torch.no_grad():
        base = layer(x)
        ev.apply_lora(pipe, lora / "toy.safetensors", strength=1.0)
        full = pipe.unet.conv_in(x)
        ev.set_lora_strength(pipe, 0.75)
        partial = pipe.unet.conv_in(x)
    assert (full - base).abs().max() > 1e-3
    torch.testing.assert_close(partial, base + 0.75 * (full - base), rtol=1e-5, atol=1e-6)
