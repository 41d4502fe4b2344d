"""With cached latents (and text embeddings) the VAE (and text encoders) stay off the training device."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from test_data_stream import BUCKETS, FOLDERS, _write

from lorafit.callbacks.export import LoraExport
from lorafit.callbacks.samples import SampleImages
from lorafit.data.cache import cache
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.training.module import LoraDiffusionModule


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("host-parts")
    _write(base / "train", FOLDERS, 1)
    prepare(str(base / "train"), out=str(base / "prepared"), **BUCKETS)
    cache(str(base / "prepared"), out=str(base / "latents"), model=tiny_models["sdxl"], **BUCKETS)
    cache(
        str(base / "prepared"),
        out=str(base / "latents+text"),
        model=tiny_models["sdxl"],
        text_embeddings=True,
        **BUCKETS,
    )
    return {name: str(base / name) for name in ("prepared", "latents", "latents+text")}


@pytest.mark.parametrize(
    "train, val, unused",
    [
        ("latents+text", None, {"vae", "text_encoders"}),
        ("latents", None, {"vae"}),
        ("prepared", None, set()),
        ("latents+text", "prepared", set()),  # validation images still need the VAE and text encoders
        ("latents+text", "latents", {"vae"}),
    ],
)
def test_the_data_says_which_parts_no_batch_runs(caches, train, val, unused):
    data = LoraDataModule(shards=caches[train], val_shards=caches[val] if val else None, batch_size=2, **BUCKETS)
    data.prepare_data()
    data.setup("fit")
    assert data.unused_model_parts() == unused


class _Placement(pl.Callback):
    """What Lightning put in the module tree when training started, and where the VAE was."""

    def on_train_start(self, trainer, pl_module):
        self.children = set(dict(pl_module.named_children()))
        self.moved = {id(p) for p in pl_module.parameters()}
        self.vae_params = list(pl_module.vae.parameters())
        self.text_params = [p for encoder in pl_module.text_encoders for p in encoder.parameters()]


def _fit(model: str, shards: str, root, **module_kwargs):
    module = LoraDiffusionModule(model=model, rank=4, **module_kwargs)
    placement = _Placement()
    samples = SampleImages(prompts=["a photo of ohwx --w 64 --h 64 --s 2 --d 1"], every_n_epochs=1)
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[placement, samples, LoraExport(name="parts")],
    )
    trainer.fit(module, datamodule=LoraDataModule(shards=shards, batch_size=2, **BUCKETS))
    return module, placement, samples


def test_cached_training_keeps_vae_and_text_encoders_out_of_the_moved_module(tiny_models, caches, tmp_path):
    module, placement, samples = _fit(tiny_models["sdxl"], caches["latents+text"], tmp_path)
    assert module.host_parts.names == ("vae", "text_encoders")
    assert {"vae", "text_encoders"}.isdisjoint(placement.children) and "unet" in placement.children
    assert placement.vae_params and placement.text_params
    assert placement.moved.isdisjoint(id(p) for p in placement.vae_params + placement.text_params)
    # Sampling borrowed them: the images were rendered, and the parts are back where they were.
    assert samples.written and Image.open(samples.written[0]).size == (64, 64)
    assert all(p.device.type == "cpu" for p in module.vae.parameters())
    assert (tmp_path / "lora" / "parts.safetensors").is_file()


def test_text_encoders_with_lora_stay_in_the_module(tiny_models, caches, tmp_path):
    module, placement, _ = _fit(tiny_models["sdxl"], caches["latents"], tmp_path, train_text_encoder=True)
    assert module.host_parts.names == ("vae",)
    assert "text_encoders" in placement.children and "vae" not in placement.children


def test_borrowing_moves_to_the_device_and_gives_back_the_same_host_weights(tiny_models):
    module = LoraDiffusionModule(model=tiny_models["sd1"], rank=4)
    module.configure_model()
    module.host_parts.park({"vae", "text_encoders"}, text_encoders_train=False)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in module.vae.named_parameters()}
    module._device = torch.device("meta")  # stands in for the GPU: where Lightning moved the module
    with module.host_parts_on_device():
        assert all(p.device.type == "meta" for p in module.vae.parameters())
        assert all(p.device.type == "meta" for p in module.text_encoders.parameters())
    for name, p in module.vae.named_parameters():
        pointer, value = before[name]
        assert p.device.type == "cpu" and p.data_ptr() == pointer and torch.equal(p, value), name


def test_no_move_reaches_the_host_parts_from_configure_model_to_the_end_of_fit(
    tiny_models, caches, tmp_path, monkeypatch
):
    """Every ``.to()``/``.cuda()``/``.half()`` of a module runs ``nn.Module._apply`` on it and its children:
    from the end of ``configure_model`` (where they leave the tree) through Lightning's move to the
    device, the training steps and a sample round, none may reach the VAE or the text encoders. On a
    GPU any such call would put their 1.8 GB (SDXL) on the card; on this CPU it is the call that shows."""
    applied: list[torch.nn.Module] = []
    recording = False
    original_apply = torch.nn.Module._apply

    def spy(self, fn, recurse=True):
        if recording:
            applied.append(self)
        return original_apply(self, fn, recurse)

    monkeypatch.setattr(torch.nn.Module, "_apply", spy)
    original_configure = LoraDiffusionModule.configure_model

    def configure_then_record(self):
        nonlocal recording
        original_configure(self)
        recording = True

    monkeypatch.setattr(LoraDiffusionModule, "configure_model", configure_then_record)
    module, _, samples = _fit(tiny_models["sdxl"], caches["latents+text"], tmp_path)
    assert samples.written  # the sample round ran (and borrowed the parts)
    assert any(m is module for m in applied), "Lightning's move to the device was not seen"
    parked = {id(m) for part in (module.vae, *module.text_encoders) for m in part.modules()}
    moved = [type(m).__name__ for m in applied if id(m) in parked]
    assert not moved, moved
