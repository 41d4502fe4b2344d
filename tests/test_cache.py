"""`lorafit cache`: cached latents (and text embeddings) train exactly like the images they came from."""

from __future__ import annotations

import pytest
import torch
from test_data_stream import BUCKETS, FOLDERS, _write

from lorafit.cli import main
from lorafit.data.cache import cache
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.errors import LorafitError
from lorafit.training.module import LoraDiffusionModule


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("cache")
    _write(base / "train", FOLDERS, 1)
    prepare(str(base / "train"), out=str(base / "prepared"), **BUCKETS)
    cache(
        str(base / "prepared"),
        out=str(base / "cached"),
        model=tiny_models["sdxl"],
        text_embeddings=True,
        flip_aug=True,
        batch_size=3,
        **BUCKETS,
    )
    return base / "prepared", base / "cached"


def _held_out(source, **kwargs) -> dict[str, dict]:
    """Every sample once, centred, keyed by its source image: one-sample batches."""
    dm = LoraDataModule(shards=str(source), val_shards=str(source), batch_size=1, **BUCKETS, **kwargs)
    dm.prepare_data()
    dm.setup("validate")
    return {batch["keys"][0]: batch for batch in dm.val_dataloader()}


def test_cached_and_uncached_training_give_the_same_loss(tiny_models, shards):
    prepared, cached = shards
    module = LoraDiffusionModule(model=tiny_models["sdxl"], rank=4)
    module.configure_model()
    module.noise_seed = 0
    images, latents = _held_out(prepared), _held_out(cached)
    assert images.keys() == latents.keys() and len(images) == 9
    for key, batch in images.items():
        assert "latent_moments" in latents[key] and "prompt_embeds" in latents[key]
        assert "pixel_values" not in latents[key]
        with torch.no_grad():
            uncached = module.denoising_loss(batch, torch.Generator().manual_seed(7))
            from_cache = module.denoising_loss(latents[key], torch.Generator().manual_seed(7))
        torch.testing.assert_close(from_cache, uncached, rtol=1e-5, atol=1e-6)


def test_fit_on_cached_latents_with_flips(tiny_models, shards, tmp_path):
    _, cached = shards
    main(
        [
            "fit",
            "--model.model",
            tiny_models["sdxl"],
            "--model.rank",
            "4",
            "--data.shards",
            str(cached),
            "--data.flip_aug",
            "true",
            "--data.resolution",
            "64",
            "--data.min_bucket_reso",
            "32",
            "--data.max_bucket_reso",
            "128",
            "--data.bucket_reso_steps",
            "32",
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "3",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--export.name",
            "c",
        ]
    )
    assert (tmp_path / "lora" / "c.safetensors").is_file()


def test_cached_shards_refuse_other_settings(shards):
    _, cached = shards
    with pytest.raises(LorafitError, match="cached for"):
        dm = LoraDataModule(
            shards=str(cached), resolution=96, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32
        )
        dm.prepare_data()
        dm.setup("fit")
    with pytest.raises(LorafitError, match="random_crop"):
        dm = LoraDataModule(shards=str(cached), random_crop=True, **BUCKETS)
        dm.prepare_data()
        dm.setup("fit")
    with pytest.raises(LorafitError, match="cached text embeddings"):
        dm = LoraDataModule(shards=str(cached), shuffle_caption=True, **BUCKETS)
        dm.prepare_data()
        dm.setup("fit")
