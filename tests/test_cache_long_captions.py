"""`lorafit cache --text_embeddings --max_token_length 225`: kohya's long captions, cached.

The cached embeddings hold every 75-token chunk, joined exactly as training would join them when
encoding the captions itself, so a LoRA trained from the cache is the LoRA trained from the images.
A cache made for another max_token_length (or clip_skip) is refused at fit start in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training import train

from lorafit.cli import main
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.data.sample_transform import collate
from lorafit.errors import LorafitError
from lorafit.families.clip_text import tokenize
from lorafit.families.loading import load_base_model
from lorafit.training.module import LoraDiffusionModule

# The tiny tokenizers give a token per character (spaces excepted): HEAD is ~160 tokens, into the
# third 75-token chunk, and the captions differ only after it, so only a 225-token reading sees them.
HEAD = "a photo of ohwx dog, " + "grass, " * 25
TAILS = ["red collar", "blue collar"]
# tests/training.py's tiny_data bucket settings: one 64 px bucket for these images.
BUCKETS = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 64}


@pytest.fixture(scope="module")
def long_shards(tmp_path_factory, tiny_models) -> tuple[Path, Path]:
    """(prepared shards, their `lorafit cache --text_embeddings --max_token_length 225` copy) for SDXL."""
    base = tmp_path_factory.mktemp("long-cache")
    for n, tail in enumerate(TAILS):
        path = base / "train" / "2_ohwx dog" / f"img{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (40 * n, 200 - 30 * n, 90)).save(path)
        path.with_suffix(".txt").write_text(HEAD + tail)
    prepare(str(base / "train"), out=str(base / "prepared"), **BUCKETS)
    flags = [f"--{key}={value}" for key, value in BUCKETS.items()]
    main(
        [
            "cache",
            str(base / "prepared"),
            "--out",
            str(base / "cached"),
            "--model",
            tiny_models["sdxl"],
            "--text_embeddings",
            "true",
            "--max_token_length",
            "225",
            "--batch_size",
            "3",
            *flags,
        ]
    )
    return base / "prepared", base / "cached"


def _cached_samples(cached: Path) -> dict[str, dict]:
    """Every cached sample, centred and unshuffled, by caption."""
    dm = LoraDataModule(shards=str(cached), val_shards=str(cached), batch_size=2, **BUCKETS)
    dm.prepare_data()
    dm.setup("validate")
    samples = {}
    for batch in dm.val_dataloader():
        for j, caption in enumerate(batch["captions"]):
            samples[caption] = {
                "prompt_embeds": batch["prompt_embeds"][j],
                "pooled": batch["pooled_prompt_embeds"][j] if "pooled_prompt_embeds" in batch else None,
                "batch_shape": tuple(batch["prompt_embeds"].shape),
            }
    return samples


def test_cache_records_max_token_length_and_stores_every_chunk(tiny_models, long_shards):
    _, cached = long_shards
    assert json.loads((cached / "dataset.json").read_text())["cached"]["max_token_length"] == 225
    base = load_base_model(tiny_models["sdxl"])
    for tokenizer in base.tokenizers:  # the captions really reach the third chunk, and not past it
        assert 150 < len(tokenizer(HEAD).input_ids) - 2 < 225 - len("blue collar")
    samples = _cached_samples(cached)
    assert sorted(samples) == sorted(HEAD + tail for tail in TAILS)
    red, blue = samples[HEAD + "red collar"], samples[HEAD + "blue collar"]
    # Batches of two long embeddings collate: start + 3 x 75 caption tokens + end.
    assert red["batch_shape"][:2] == (2, 1 + 225 + 1)
    # The first two chunks hold the same words; only the third, beyond token 152, tells the
    # captions apart. Cut at 75 or 150 tokens, the two cached embeddings would be the same.
    torch.testing.assert_close(red["prompt_embeds"][:152], blue["prompt_embeds"][:152])
    assert not torch.allclose(red["prompt_embeds"][152:], blue["prompt_embeds"][152:], atol=1e-4)
    torch.testing.assert_close(red["pooled"], blue["pooled"])  # SDXL's pooled: the first chunk's (kohya)


def test_cached_long_embeddings_are_what_training_would_encode(tiny_models, long_shards):
    _, cached = long_shards
    module = LoraDiffusionModule(model=tiny_models["sdxl"], rank=4, max_token_length=225)
    module.configure_model()
    samples = _cached_samples(cached)
    captions = sorted(samples)
    with torch.no_grad():
        encoded = module.text_conditioning({"captions": captions})
    torch.testing.assert_close(
        torch.stack([samples[c]["prompt_embeds"] for c in captions]), encoded["prompt_embeds"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.stack([samples[c]["pooled"] for c in captions]), encoded["pooled_prompt_embeds"], rtol=1e-5, atol=1e-6
    )


def _lora(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "lora" / "test.safetensors"))


def _sources(shards: Path) -> list[str]:
    dm = LoraDataModule(shards=str(shards), val_shards=str(shards), batch_size=1, **BUCKETS)
    dm.prepare_data()
    dm.setup("validate")
    return [key for batch in dm.val_dataloader() for key in batch["keys"]]


def test_training_from_the_long_cache_gives_the_uncached_lora(tiny_models, long_shards, tmp_path):
    prepared, cached = long_shards
    # `lorafit cache` keeps the prepared shards and order: both runs see the same batches.
    assert _sources(cached) == _sources(prepared)
    runs = {"images": (prepared, 225), "cache": (cached, 225), "cut": (prepared, None)}
    for name, (shards, max_token_length) in runs.items():
        train(
            tiny_models["sdxl"],
            None,
            tmp_path / name,
            max_epochs=2,
            max_token_length=max_token_length,
            data_kwargs={"shards": str(shards)},
        )
    from_images, from_cache, cut = _lora(tmp_path / "images"), _lora(tmp_path / "cache"), _lora(tmp_path / "cut")
    assert from_images.keys() == from_cache.keys() == cut.keys()
    # Not bit-identical: the encoders ran on batches of other sizes at cache time (float rounding),
    # and Adam's normalised steps carry that rounding into the weights.
    for key in from_images:
        torch.testing.assert_close(from_cache[key], from_images[key], rtol=1e-4, atol=1e-5, msg=key)
    # The caption tails beyond 150 tokens do change what is learnt, far beyond that rounding: the
    # agreement above is not that of two runs blind to them.
    assert _distance(cut, from_images) > 100 * _distance(from_cache, from_images)


def _distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_training_refuses_a_cache_of_another_max_token_length(tiny_models, long_shards, tmp_path, capsys):
    _, cached = long_shards
    base_args = [
        "fit",
        "--model.model",
        tiny_models["sdxl"],
        "--model.rank",
        "4",
        "--data.shards",
        str(cached),
        *[f"--data.{key}={value}" for key, value in BUCKETS.items()],
        "--trainer.max_steps",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    for model_setting, shown in (([], "empty (75 tokens)"), (["--model.max_token_length", "150"], "150")):
        with pytest.raises(SystemExit):
            main(base_args + model_setting)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorafit: error:")]
        assert len(lines) == 1, lines
        assert (
            "max_token_length 225" in lines[0]
            and f"model.conditioning.max_token_length is {shown}" in lines[0]
            and "lorafit cache" in lines[0]
        ), lines[0]
    assert not (tmp_path / "lora").exists()


def test_caches_without_the_key_count_as_75_tokens_and_clip_skip_must_match(tiny_models):
    sdxl = LoraDiffusionModule(model=tiny_models["sdxl"], rank=4, max_token_length=225)
    sdxl.configure_model()
    made = {"family": "sdxl", "model": tiny_models["sdxl"], "text_embeddings": True, "clip_skip": 1}
    with pytest.raises(LorafitError, match=r"max_token_length 75 .*model.conditioning.max_token_length is 225"):
        sdxl.check_cache(made)  # a cache written before --max_token_length existed
    sdxl.check_cache({**made, "max_token_length": 225})
    sdxl.check_cache({**made, "text_embeddings": False})  # latents only: captions are encoded in training
    sd1 = LoraDiffusionModule(model=tiny_models["sd1"], rank=4, clip_skip=2)
    sd1.configure_model()
    with pytest.raises(LorafitError, match=r"clip_skip 1, but model.conditioning.clip_skip is 2"):
        sd1.check_cache({**made, "family": "sd1", "model": tiny_models["sd1"]})


def test_cached_embeddings_of_the_wrong_length_fail_per_batch(tiny_models, long_shards):
    """Validation shards and `lorafit validate` are not checked at fit start: the batch itself is."""
    _, cached = long_shards
    module = LoraDiffusionModule(model=tiny_models["sdxl"], rank=4, max_token_length=150)
    module.configure_model()
    sample = next(iter(_cached_samples(cached).values()))
    batch = {
        "captions": ["x"],
        "prompt_embeds": sample["prompt_embeds"][None],
        "pooled_prompt_embeds": sample["pooled"][None],
    }
    with pytest.raises(
        LorafitError, match=r"227 token positions, but model.conditioning.max_token_length 150 needs 152"
    ):
        module.text_conditioning(batch)


def test_collate_names_mixed_caches_instead_of_a_stack_error():
    def item(length):
        return {
            "caption": "c",
            "original_size": (64, 64),
            "crop_top_left": (0, 0),
            "is_reg": False,
            "key": "k",
            "latent_moments": torch.zeros(8, 8, 8),
            "prompt_embeds": torch.zeros(length, 16),
        }

    assert collate([item(227), item(227)])["prompt_embeds"].shape == (2, 227, 16)
    with pytest.raises(LorafitError, match=r"\[77, 227\] token positions.*--max_token_length"):
        collate([item(227), item(77)])


def test_cache_rejects_a_nonpositive_max_token_length(long_shards, tiny_models, tmp_path):
    prepared, _ = long_shards
    with pytest.raises(LorafitError, match="--max_token_length: 0"):
        from lorafit.data.cache import cache

        cache(
            str(prepared),
            out=str(tmp_path / "c"),
            model=tiny_models["sdxl"],
            text_embeddings=True,
            max_token_length=0,
            **BUCKETS,
        )


def test_tokenize_with_max_token_length_matches_hidden_length(tiny_models):
    from lorafit.families.clip_text import hidden_length

    base = load_base_model(tiny_models["sd1"])
    [ids] = tokenize(base.tokenizers, [HEAD], max_token_length=225)
    assert ids.shape == (1, 3, 77)
    assert [hidden_length(base.tokenizers[0], n) for n in (None, 75, 150, 225)] == [77, 77, 152, 227]


@pytest.mark.parametrize(("family", "clip_skip"), [("sd1", 2), ("sd2", 1)])
def test_sd1_and_sd2_caches_hold_the_long_embeddings_training_computes(
    tiny_models, long_shards, tmp_path, family, clip_skip
):
    """SD1 (with clip skip, re-normalised) and SD2 (padding other than the end token) chunk too; the
    model accepts their caches at fit start."""
    from lorafit.data.cache import cache

    prepared, _ = long_shards
    summary = cache(
        str(prepared),
        out=str(tmp_path / "cached"),
        model=tiny_models[family],
        text_embeddings=True,
        clip_skip=clip_skip,
        max_token_length=225,
        batch_size=3,
        **BUCKETS,
    )
    module = LoraDiffusionModule(model=tiny_models[family], rank=4, max_token_length=225, clip_skip=clip_skip)
    module.configure_model()
    module.check_cache(summary["cached"])
    samples = _cached_samples(tmp_path / "cached")
    captions = sorted(samples)
    assert captions == sorted(HEAD + tail for tail in TAILS)
    with torch.no_grad():
        encoded = module.text_conditioning({"captions": captions})
    cached = torch.stack([samples[c]["prompt_embeds"] for c in captions])
    assert cached.shape[1] == 227
    torch.testing.assert_close(cached, encoded["prompt_embeds"], rtol=1e-5, atol=1e-6)
    # The third chunk tells the captions apart: cut at 150 tokens they would be the same.
    assert not torch.allclose(cached[0, 152:], cached[1, 152:], atol=1e-4)
