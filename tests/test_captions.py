"""Caption operations (kohya meanings) and the per-sample image transform."""

from __future__ import annotations

import io
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from lorafit.data.captions import CaptionOps
from lorafit.data.images import decode_rgb_with_fixes
from lorafit.data.shard_index import load_index
from lorafit.errors import LorafitError

CAPTION = "ohwx dog, sitting, grass, sunny, red collar"


def test_trigger_word_is_prepended_once_and_never_to_reg():
    ops = CaptionOps(trigger_word="ohwx")
    rng = random.Random(0)
    assert ops.apply("dog, sitting", rng) == "ohwx, dog, sitting"
    assert ops.apply(CAPTION, rng) == CAPTION  # already there
    assert ops.apply("dog, sitting", rng, is_reg=True) == "dog, sitting"
    assert ops.apply("ohwxdog, sitting", rng) == "ohwx, ohwxdog, sitting"  # a word, not a substring


def test_shuffle_keeps_the_first_tokens_and_every_tag():
    ops = CaptionOps(shuffle_caption=True, keep_tokens=1)
    outputs = {ops.apply(CAPTION, random.Random(seed)) for seed in range(30)}
    assert len(outputs) > 5
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "ohwx dog" and sorted(tags) == sorted(CAPTION.split(", "))
    assert CaptionOps(shuffle_caption=True).apply(CAPTION, random.Random(3)) == CaptionOps(shuffle_caption=True).apply(
        CAPTION, random.Random(3)
    )


def test_caption_and_tag_dropout_rates():
    rng = random.Random(1)
    dropped = sum(CaptionOps(caption_dropout_rate=0.25).apply(CAPTION, rng) == "" for _ in range(4000))
    assert 850 < dropped < 1150
    ops = CaptionOps(tag_dropout_rate=0.5, keep_tokens=1)
    kept = [len(ops.apply(CAPTION, rng).split(", ")) - 1 for _ in range(2000)]
    assert all(ops.apply(CAPTION, random.Random(s)).startswith("ohwx dog") for s in range(50))
    assert 1.8 < sum(kept) / len(kept) < 2.2  # 4 droppable tags at p=0.5


def test_custom_separator_and_bad_settings():
    ops = CaptionOps(trigger_word="ohwx", separator="|")
    assert ops.apply("dog|grass", random.Random(0)) == "ohwx|dog|grass"
    with pytest.raises(LorafitError, match="data.caption_dropout_rate"):
        CaptionOps(caption_dropout_rate=1.5)
    assert CaptionOps().is_identity and not CaptionOps(shuffle_caption=True).is_identity


def test_jpeg_draft_decode_matches_full_decode_after_resize():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    photo = Image.fromarray(smooth).resize((960, 640), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    full = decode_rgb_with_fixes(io.BytesIO(buffer.getvalue()), "x").image
    drafted = decode_rgb_with_fixes(io.BytesIO(buffer.getvalue()), "x", draft_size=(240, 160)).image
    assert drafted.width < full.width and drafted.width >= 240
    a = np.asarray(full.resize((240, 160), Image.Resampling.LANCZOS), dtype=np.float32)
    b = np.asarray(drafted.resize((240, 160), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(a - b).mean() < 2.0  # of 255: visually identical


def test_foreign_shards_are_indexed_once_from_their_members(tmp_path, monkeypatch):
    """Shards without lorafit's index.json (a brace pattern of someone else's shards) get scanned and cached."""
    import webdataset as wds

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"web-{s:03d}.tar")) as sink:
            for i in range(3):
                img = io.BytesIO()
                Image.new("RGB", (40 + 8 * i, 32)).save(img, "PNG")
                sink.write({"__key__": f"{s}-{i}", "png": img.getvalue(), "txt": "a photo"})
    index = load_index(str(tmp_path / "web-{000..001}.tar"), "data.shards")
    assert [len(shard.samples) for shard in index.shards] == [3, 3]
    assert index.shards[0].samples[1] == (48, 32, 1, 0)
    assert list((tmp_path / "cache" / "index").glob("*.json"))
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(LorafitError, match="not indexed yet"):
        load_index(str(tmp_path / "web-{000..001}.tar"), "data.shards", scan=False)
