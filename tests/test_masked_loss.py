"""Masked loss: per-image masks (``<stem>_mask.png`` or the alpha channel) travel with their image through
prepare, buckets, crops, flips and the cache, and weigh the loss with a configurable floor."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from training import tiny_batch, train

from lorafit.data.buckets import select_bucket
from lorafit.data.cache import cache
from lorafit.data.captions import CaptionOps
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.kohya_folders import scan_tree
from lorafit.data.prepare import prepare
from lorafit.data.sample_transform import SampleTransform
from lorafit.training.masked_loss import latent_weights
from lorafit.training.module import LoraDiffusionModule

BUCKETS = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


def _picture(size, box, mode="RGB") -> Image.Image:
    """Black picture with a white rectangle ``box`` (left, top, right, bottom)."""
    img = Image.new(mode, size, 0)
    img.paste(255 if mode == "L" else (255, 255, 255), box)
    return img


def _samples(folder) -> dict[str, dict]:
    urls = sorted(str(p) for p in folder.glob("train-*.tar"))
    return {json.loads(s["json"])["relpath"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def test_mask_files_and_alpha_channels_become_each_samples_mask(tmp_path):
    concept = tmp_path / "src" / "3_ohwx"
    concept.mkdir(parents=True)
    _picture((96, 64), (10, 10, 40, 50)).save(concept / "a.jpg")
    _picture((48, 32), (5, 5, 20, 25), "L").save(concept / "a_mask.png")  # painted on a half-size copy
    cutout = Image.new("RGBA", (64, 64), (200, 0, 0, 0))
    cutout.paste((200, 0, 0, 255), (16, 16, 48, 48))
    cutout.save(concept / "b.png")
    _picture((64, 64), (0, 0, 64, 64)).save(concept / "c.png")
    _picture((64, 48), (0, 0, 8, 8), "L").save(concept / "c_mask.png")  # another aspect ratio: not c's
    (concept / "d_mask.png").write_bytes((concept / "a_mask.png").read_bytes())  # no d.*: an image of its own

    scan = scan_tree(tmp_path / "src")
    assert sorted(r.path.name for r in scan.records) == ["a.jpg", "b.png", "c.png", "d_mask.png"]
    assert {r.path.name: r.mask and r.mask.name for r in scan.records}["a.jpg"] == "a_mask.png"

    summary = prepare(str(tmp_path / "src"), out=str(tmp_path / "out"), alpha_mask=True, **BUCKETS)
    samples = _samples(tmp_path / "out")
    a, b = samples["3_ohwx/a.jpg"], samples["3_ohwx/b.png"]
    assert json.loads(a["json"])["mask"] == "file" and json.loads(b["json"])["mask"] == "alpha"
    mask_a = np.asarray(Image.open(io.BytesIO(a["mask.png"])))
    assert mask_a.shape == (64, 96) and mask_a[30, 25] == 255 and mask_a[5, 80] == 0  # scaled to the image
    mask_b = np.asarray(Image.open(io.BytesIO(b["mask.png"])))
    assert mask_b[32, 32] == 255 and mask_b[2, 2] == 0
    assert "mask.png" not in samples["3_ohwx/d_mask.png"]
    assert summary["loss_masks"] == {"alpha": 1, "file": 1}
    # The mismatched mask costs its image, with the reason in the report, never a silent unmasked sample.
    (skipped,) = summary["skipped"]
    assert skipped["path"].endswith("c.png") and "c_mask.png is 64x48 but its image is 64x64" in skipped["reason"]
    assert "Loss masks: 1 from alpha channels, 1 from _mask files" in (tmp_path / "out" / "report.md").read_text()


def test_without_alpha_mask_a_cutout_trains_unmasked(tmp_path):
    concept = tmp_path / "src" / "1_x"
    concept.mkdir(parents=True)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(concept / "b.png")
    summary = prepare(str(tmp_path / "src"), out=str(tmp_path / "out"), **BUCKETS)
    assert summary["loss_masks"] == {} and "mask.png" not in _samples(tmp_path / "out")["1_x/b.png"]


def test_crops_and_flips_move_the_mask_with_its_image():
    """Image and mask show the same rectangle: after any bucket resize, random crop and flip, the
    image's bright pixels are the mask's."""
    transform = SampleTransform(CaptionOps(), crop="random", flip_aug=True)
    unflipped = SampleTransform(CaptionOps(), crop="random")
    rng, flips = random.Random(0), 0
    for trial in range(12):
        w, h = rng.choice([(96, 64), (64, 112), (200, 90)])
        box = (rng.randrange(w // 2), rng.randrange(h // 2), w - rng.randrange(1, w // 3), h - rng.randrange(1, h // 3))
        sample = {"png": _png(_picture((w, h), box)), "mask.png": _png(_picture((w, h), box, "L"))}
        sample["json"] = json.dumps({"w": w, "h": h}).encode()
        choice = select_bucket(w, h, table=[(64, 64), (96, 64), (64, 96), (128, 64)])
        draws = random.Random(trial)
        pixels, mask, _, crop = transform.pixels_and_mask(sample, choice, draws, "x")
        plain, _, plain_crop = transform.pixels(sample, choice, random.Random(trial), "x")
        assert torch.equal(pixels, plain) and plain_crop == crop  # a mask changes no draw
        assert mask.shape == (1, *pixels.shape[1:]) and mask.min() >= 0 and mask.max() <= 1
        brightness = (pixels.mean(0, keepdim=True) + 1) / 2
        assert (brightness - mask).abs().mean() < 0.03, trial
        flips += not torch.equal(mask, unflipped.pixels_and_mask(sample, choice, random.Random(trial), "x")[1])
    assert flips, "no trial flipped: the test should exercise flips"


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def test_latent_weights_average_the_mask_down_and_lift_it_to_the_floor():
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, :8] = 1.0  # left half
    mask[1, :, :4, :4] = 1.0  # a small corner
    w = latent_weights(mask, (4, 4), floor=0.0, normalize=False)
    assert w.shape == (2, 1, 4, 4)
    assert torch.equal(w[0, 0, :, :2], torch.ones(4, 2)) and torch.equal(w[0, 0, :, 2:], torch.zeros(4, 2))
    assert w[1].sum() == 1.0  # exactly one latent position covers the corner
    lifted = latent_weights(mask, (4, 4), floor=0.25, normalize=False)
    assert torch.allclose(lifted[0, 0, :, 2:], torch.full((4, 2), 0.25))
    normal = latent_weights(mask, (4, 4), floor=0.1, normalize=True)
    assert torch.allclose(normal.mean(dim=(1, 2, 3)), torch.ones(2))  # a small subject weighs as much
    assert latent_weights(mask, (4, 4), floor=1.0, normalize=False) is None
    assert latent_weights(None, (4, 4), floor=0.0, normalize=True) is None


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_the_loss_is_weighted_by_the_mask_with_its_floor(family, tiny_models, masked_data):
    batch = tiny_batch(masked_data, 2)
    assert batch["loss_mask"].shape[1] == 1 and 0.4 < batch["loss_mask"].mean() < 0.6

    def loss(mask, **settings) -> torch.Tensor:
        module = LoraDiffusionModule(model=tiny_models[family], rank=4, loss=settings)
        module.configure_model()
        unmasked = {key: value for key, value in batch.items() if key != "loss_mask"}
        with torch.no_grad():
            return module.denoising_loss(
                unmasked if mask is None else {**unmasked, "loss_mask": mask}, torch.Generator().manual_seed(3)
            )

    plain = loss(None)
    ones, zeros = torch.ones_like(batch["loss_mask"]), torch.zeros_like(batch["loss_mask"])
    torch.testing.assert_close(loss(ones), plain)
    torch.testing.assert_close(loss(zeros, mask_floor=0.3), 0.3 * plain)
    torch.testing.assert_close(loss(zeros, mask_floor=0.3, mask_normalize=True), plain)
    assert loss(zeros).item() == 0.0
    half = loss(batch["loss_mask"])  # the left halves only
    assert 0.0 < half.item() < plain.item()
    torch.testing.assert_close(loss(batch["loss_mask"], mask_floor=1.0), plain)  # floor 1: masks ignored


def test_cached_latents_carry_the_same_masks_flipped_with_them(tiny_models, masked_data, tmp_path):
    prepare(masked_data, out=str(tmp_path / "prepared"), **BUCKETS)
    cache(str(tmp_path / "prepared"), out=str(tmp_path / "cached"), model=tiny_models["sd1"], flip_aug=True, **BUCKETS)

    def epoch(folder) -> list[dict]:
        dm = LoraDataModule(shards=str(folder), seed=2, batch_size=2, flip_aug=True, **BUCKETS)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.position = lambda: (0, 0)
        return list(loader)

    images, latents = epoch(tmp_path / "prepared"), epoch(tmp_path / "cached")
    assert [b["keys"] for b in images] == [b["keys"] for b in latents]
    flipped = 0
    for image, latent in zip(images, latents):
        assert torch.equal(image["loss_mask"], latent["loss_mask"])
        flipped += int(bool((image["loss_mask"][:, :, :, -1] > 0.5).any()))  # white on the right: flipped
    assert flipped, "no flipped sample: the test should exercise flips"


def test_a_masked_run_resumes_exactly(tiny_models, masked_data, tmp_path):
    kwargs = dict(batch_size=2, learning_rate=5e-3, loss={"mask_floor": 0.2})
    _, straight = train(tiny_models["sd1"], masked_data, tmp_path / "straight", max_epochs=2, **kwargs)
    train(tiny_models["sd1"], masked_data, tmp_path / "stopped", max_epochs=1, **kwargs)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    _, resumed = train(
        tiny_models["sd1"], masked_data, tmp_path / "stopped", max_epochs=2, ckpt_path=str(checkpoint), **kwargs
    )
    a = {k: v for k, v in straight.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.state_dict().items() if "lora_" in k}
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The masks changed what was learnt: the same run without them trains another LoRA.
    _, unmasked = train(
        tiny_models["sd1"], masked_data, tmp_path / "unmasked", max_epochs=2, **{**kwargs, "loss": {"mask_floor": 1.0}}
    )
    c = {k: v for k, v in unmasked.state_dict().items() if "lora_" in k}
    assert any(not torch.equal(a[k], c[k]) for k in a)
