"""`lorafit cache`: cached latents (and text embeddings) train exactly like the images they came from."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_data_stream import BUCKETS, FOLDERS, REG, _as_rank, _epoch, _module, _write

from lorafit.cli import main
from lorafit.data.cache import cache
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.errors import LorafitError
from lorafit.families.loading import load_base_model
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


@pytest.fixture(scope="module")
def several_shards(tmp_path_factory, tiny_models):
    """(prepared, cached): images and reg images in shards of 4, cached with flips in VAE batches of 3."""
    base = tmp_path_factory.mktemp("cache-order")
    _write(base / "train", FOLDERS, 1)
    _write(base / "reg", REG, 2)
    for path in base.rglob("*.png"):  # left and right halves apart: a flip shows
        image = Image.open(path)
        image.paste((255, 255, 255), (0, 0, image.width // 2, image.height))
        image.save(path)
    prepare(str(base / "train"), out=str(base / "prepared"), reg=str(base / "reg"), max_samples_per_shard=4, **BUCKETS)
    cache(
        str(base / "prepared"),
        out=str(base / "cached"),
        model=tiny_models["sdxl"],
        flip_aug=True,
        batch_size=3,
        **BUCKETS,
    )
    return base / "prepared", base / "cached"


def test_cached_shards_mirror_the_source_shards(several_shards):
    source, made = (json.loads((folder / "index.json").read_text())["shards"] for folder in several_shards)
    assert [shard["name"] for shard in made] == [shard["name"] for shard in source] and len(source) == 3
    for a, b in zip(source, made):  # same samples in the same order, with the bucket fixed at cache time
        assert [row[:4] for row in b["samples"]] == a["samples"]


@pytest.mark.parametrize(("world_size", "global_batch"), [(1, False), (2, False), (2, True)])
def test_a_cached_run_plays_the_uncached_order_flips_and_captions(
    tiny_models, several_shards, world_size, global_batch
):
    """Same seed, cached or not: the same batches of the same samples, flipped alike, on every rank."""
    prepared, cached = several_shards
    vae = load_base_model(tiny_models["sdxl"]).vae.eval()
    flips = 0
    for rank in range(world_size):
        runs = [
            _as_rank(_module(folder, seed=4, flip_aug=flip, global_batch=global_batch), rank, world_size)
            for folder, flip in ((prepared, True), (cached, True), (prepared, False))
        ]
        for epoch in (0, 1):
            images, latents, unflipped = (_epoch(dm, epoch=epoch) for dm in runs)
            assert [b["keys"] for b in latents] == [b["keys"] for b in images] and images
            for image, latent, plain in zip(images, latents, unflipped):
                flips += sum(not torch.equal(a, b) for a, b in zip(image["pixel_values"], plain["pixel_values"]))
                assert latent["captions"] == image["captions"]
                assert torch.equal(latent["original_size"], image["original_size"])
                assert torch.equal(latent["crop_top_left"], image["crop_top_left"])
                with torch.no_grad():
                    moments = vae.encode(image["pixel_values"]).latent_dist.parameters
                # The cached moments are those of the very image (flipped or not) the uncached run trains on.
                torch.testing.assert_close(latent["latent_moments"], moments, rtol=1e-4, atol=1e-5)
    assert flips, "no image was flipped: the test should exercise flips"


def test_cache_keeps_what_the_user_gave(several_shards):
    prepared, _ = several_shards
    with pytest.raises(LorafitError, match="holds the source shard"):
        cache(str(prepared), out=str(prepared), model="unused", overwrite=True, **BUCKETS)
    assert (prepared / "dataset.json").is_file()
    with pytest.raises(LorafitError, match="is not empty"):
        cache(str(prepared), out=str(prepared.parent / "cached"), model="unused", **BUCKETS)
