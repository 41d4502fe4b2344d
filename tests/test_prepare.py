"""``lorafit prepare``: a messy kohya tree in, webdataset shards + summary + report out.

The tree holds every kind of file that cost the seeds' authors hours (sideways phone photos,
transparent PNGs, CMYK and 16-bit files, truncated downloads, renamed text files, duplicates,
uncaptioned images), and the tests check that each is fixed or skipped *and reported*, that the
counts add up, that the shards read back with webdataset, and that the sources are never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from jsonargparse import auto_cli
from PIL import Image

import lorafit.data.prepare_write as prepare_write
from lorafit.data.buckets import make_bucket_table
from lorafit.data.prepare import prepare
from lorafit.errors import LorafitError

# Small settings keep the test fast: buckets of at most 512x512 pixels, sides 256..1024.
SETTINGS = dict(resolution=512, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64)
TABLE = make_bucket_table(512, 256, 1024, 64)

# name -> (reason substring the report must give); every one of these is a skipped file.
SKIPPED = {
    "dup.jpg": "exact duplicate of",
    "truncated.jpg": "truncated or corrupt",
    "empty.png": "empty file (0 bytes)",
    "notes.jpg": "not an image format",
    "badcap.png": "cannot be read as text",
    "loose.png": "no caption",
}
# name -> note the report must give for a written but fixed or flagged file.
FIXED = {
    "rot.jpg": "EXIF orientation applied",
    "alpha.png": "transparency composited onto white",
    "nocap.webp": "used folder prompt 'ohwx dog'",
    "c.bmp": "re-encoded as PNG",
    "d16.tiff": "16-bit image scaled",
    "cmyk.jpg": "CMYK converted",
    "anim.gif": "first frame kept",
    "tiny.png": "below the smallest bucket side you chose",
    "s.png": "palette image converted",
    "g.png": "grayscale converted",
    "r1.jpg": "used folder prompt 'dog'",
}


def _noise(size, mode="RGB", seed=0) -> Image.Image:
    # Noise, not flat colour: a flat JPEG is so small that cutting it in half may not truncate pixels.
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size[0] * size[1] * channels, dtype=np.uint8)
    return Image.frombytes(mode, size, pixels.tobytes())


def _save(img: Image.Image, path: Path, caption: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _write_tree(base: Path) -> tuple[Path, Path]:
    train, reg = base / "train", base / "reg"
    dog, cat, style = train / "10_ohwx dog", train / "5_sks cat", train / "1_style"

    a = _save(_noise((400, 300), seed=1), dog / "a.jpg", "ohwx dog, on grass, Sunny", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored 400x256 landscape, shown 256x400 portrait
    _save(_noise((400, 256), seed=2), dog / "rot.jpg", "ohwx dog, sideways photo", exif=exif)
    alpha = _noise((320, 320), "RGBA", seed=3)
    alpha.putalpha(Image.new("L", (320, 320), 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 64, 64))  # fully transparent top-left corner
    _save(alpha, dog / "alpha.png", "ohwx dog, cut-out")
    _save(_noise((384, 256), seed=4), dog / "nocap.webp", quality=90)  # no caption sidecar
    shutil.copyfile(a, dog / "dup.jpg")
    (dog / "dup.txt").write_text("ohwx dog, duplicate")
    full = io.BytesIO()
    _noise((400, 300), seed=5).save(full, "JPEG", quality=90)
    (dog / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (dog / "truncated.txt").write_text("ohwx dog, cut download")
    (dog / "empty.png").write_bytes(b"")
    (dog / "notes.jpg").write_text("this is a text file renamed to .jpg\n")
    (dog / "readme.md").write_text("not an image")
    (dog / "ghost.txt").write_text("a caption whose image was deleted")
    (dog / "a.txt.bak").write_text("the caption before `lorafit review` changed it")

    _save(_noise((300, 400), seed=6), cat / "c.bmp", "sks cat, bitmap")
    gradient = (np.arange(320 * 256, dtype=np.uint32).reshape(320, 256) % 65536).astype(np.uint16)
    _save(Image.fromarray(gradient), cat / "nested" / "d16.tiff", "sks cat, 16-bit scan")
    _save(_noise((320, 256), "CMYK", seed=7), cat / "nested" / "cmyk.jpg", "sks cat, print", quality=90)
    frames = [Image.new("RGB", (288, 288), c) for c in ((200, 40, 40), (40, 40, 200))]  # GIF stores P
    _save(frames[0], cat / "nested" / "anim.gif", "sks cat, animated", save_all=True, append_images=frames[1:])
    _save(_noise((64, 64), seed=8), cat / "nested" / "tiny.png", "sks cat, tiny")
    _save(_noise((256, 256), seed=9), cat / "badcap.png")
    (cat / "badcap.txt").write_bytes(b"\x00\x01binary\x02, not a caption")

    _save(_noise((256, 256), seed=10).convert("P"), style / "s.png", "style, painting")
    _save(_noise((256, 384), seed=11).convert("L"), style / "g.png")
    _save(_noise((256, 256), seed=12), train / "misc" / "loose.png")  # no caption, no concept folder

    _save(_noise((320, 320), seed=13), reg / "1_dog" / "r1.jpg", quality=90)
    _save(_noise((256, 320), seed=14), reg / "1_dog" / "r2.png", "a photo of a dog")
    return train, reg


def _tree_hash(*roots: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file: prepare must change neither."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = (hashlib.sha1(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("src")
    train, reg = _write_tree(base)
    return train, reg, _tree_hash(train, reg)


def _read_shards(out: Path) -> dict[str, dict]:
    """Every sample in the shards, keyed by its source path relative to its root."""
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["relpath"] not in samples
        samples[meta["relpath"]] = {**sample, "meta": meta}
    return samples


def _report_line(report: str, name: str) -> str:
    lines = [line for line in report.splitlines() if line.startswith("- `") and f"/{name}`" in line]
    assert len(lines) == 1, f"{name}: {lines}"
    return lines[0]


def test_prepare_messy_tree(tree, tmp_path):
    train, reg, before = tree
    out = tmp_path / "out"
    summary = prepare(str(train), out=str(out), reg_dir=[str(reg)], **SETTINGS)

    # Counts add up exactly, in the return value and in dataset.json alike.
    on_disk = json.loads((out / "dataset.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for s in (summary, on_disk):
        assert (s["images_in"], s["samples_written"], s["reported_skips"]) == (19, 13, 6)
        assert s["images_in"] == s["samples_written"] + s["reported_skips"]
        assert (s["instance_samples"], s["reg_samples"]) == (11, 2)
    assert sum(sh["samples"] for sh in summary["shards"]) == 13
    assert summary["shard_pattern"] == "train-000000.tar"

    # The report names every bad, fixed and ignored file with its reason.
    report = (out / "report.md").read_text()
    assert "19 images in = 13 samples written + 6 skipped" in report
    for name, reason in {**SKIPPED, **FIXED}.items():
        assert reason in _report_line(report, name), name
    assert "a.jpg" in _report_line(report, "dup.jpg")
    for name in ("readme.md", "ghost.txt"):
        assert "not an image or a .txt caption" in _report_line(report, name)
    assert "a.txt.bak" not in report  # caption backups of lorafit caption/review are expected, not noise
    assert {Path(e["path"]).name for e in summary["skipped"]} == set(SKIPPED)
    for heading in ("## Folders", "## Images per repeat weight", "## Buckets", "## Top caption tags"):
        assert heading in report

    # Per-folder counts, repeat weights, kohya tag frequency, bucket histogram.
    folders = {(Path(f["root"]).name, f["folder"]): f for f in summary["folders"]}
    assert {k: (f["images_in"], f["written"], f["skipped"]) for k, f in folders.items()} == {
        ("train", "10_ohwx dog"): (8, 4, 4),
        ("train", "5_sks cat"): (6, 5, 1),
        ("train", "1_style"): (2, 2, 0),
        ("train", "misc"): (1, 0, 1),
        ("reg", "1_dog"): (2, 2, 0),
    }
    per_repeat = summary["images_per_repeat"]
    assert {r: v["images"] for r, v in per_repeat["instance"].items()} == {"10": 4, "5": 5, "1": 2}
    assert per_repeat["instance"]["10"]["samples_per_epoch"] == 40
    assert {r: v["images"] for r, v in per_repeat["reg"].items()} == {"1": 2}
    assert summary["ss_tag_frequency"]["10_ohwx dog"]["ohwx dog"] == 4
    assert summary["ss_tag_frequency"]["10_ohwx dog"]["sunny"] == 1  # kohya lower-cases tags
    assert summary["ss_tag_frequency"]["1_dog"] == {"dog": 1, "a photo of a dog": 1}
    assert sum(summary["buckets"].values()) == 13

    # The shards hold exactly the written samples, with the right bytes and metadata.
    samples = _read_shards(out)
    assert len(samples) == 13
    assert set(samples) == {
        "10_ohwx dog/a.jpg",
        "10_ohwx dog/rot.jpg",
        "10_ohwx dog/alpha.png",
        "10_ohwx dog/nocap.webp",
        "5_sks cat/c.bmp",
        "5_sks cat/nested/d16.tiff",
        "5_sks cat/nested/cmyk.jpg",
        "5_sks cat/nested/anim.gif",
        "5_sks cat/nested/tiny.png",
        "1_style/s.png",
        "1_style/g.png",
        "1_dog/r1.jpg",
        "1_dog/r2.png",
    }
    for rel, sample in samples.items():
        meta = sample["meta"]
        image_keys = {"jpg", "png", "webp"} & set(sample)
        assert len(image_keys) == 1, rel
        image = Image.open(io.BytesIO(sample[image_keys.pop()]))
        assert image.mode == "RGB" and image.size == (meta["w"], meta["h"]), rel
        assert tuple(meta["bucket"]) in TABLE
        source = Path(meta["source"])
        assert hashlib.sha1(source.read_bytes()).hexdigest() == meta["sha1"]
        assert meta["key"] == sample["__key__"]

    a = samples["10_ohwx dog/a.jpg"]
    assert a["jpg"] == (train / "10_ohwx dog" / "a.jpg").read_bytes()  # clean JPEG: original bytes
    assert a["txt"].decode() == "ohwx dog, on grass, Sunny"  # the caption itself is kept as written
    assert (
        a["meta"].items()
        >= {
            "w": 400,
            "h": 300,
            "repeats": 10,
            "subject": "ohwx",
            "class": "dog",
            "is_reg": False,
            "stored": "original",
            "fixes": [],
            "small": False,
        }.items()
    )
    rot = samples["10_ohwx dog/rot.jpg"]["meta"]
    assert (rot["w"], rot["h"], rot["stored"], rot["fixes"]) == (256, 400, "jpeg", ["exif_transpose"])
    alpha = samples["10_ohwx dog/alpha.png"]
    assert Image.open(io.BytesIO(alpha["png"])).getpixel((5, 5)) == (255, 255, 255)
    nocap = samples["10_ohwx dog/nocap.webp"]
    assert nocap["txt"].decode() == "ohwx dog" and nocap["meta"]["caption_source"] == "folder"
    assert nocap["meta"]["stored"] == "original" and "webp" in nocap
    cat_fixes = {rel: samples[rel]["meta"]["fixes"] for rel in samples if rel.startswith("5_sks cat")}
    assert cat_fixes == {
        "5_sks cat/c.bmp": [],
        "5_sks cat/nested/d16.tiff": ["16bit_to_8bit"],
        "5_sks cat/nested/cmyk.jpg": ["cmyk_to_rgb"],
        "5_sks cat/nested/anim.gif": ["first_frame", "palette_to_rgb"],
        "5_sks cat/nested/tiny.png": [],
    }
    assert all(samples[rel]["meta"]["repeats"] == 5 for rel in cat_fixes)
    assert samples["5_sks cat/c.bmp"]["meta"]["stored"] == "png"
    assert samples["5_sks cat/nested/cmyk.jpg"]["meta"]["stored"] == "jpeg"
    assert samples["5_sks cat/nested/tiny.png"]["meta"]["small"] is True
    style = samples["1_style/g.png"]
    assert (style["meta"]["subject"], style["meta"]["class"]) == ("style", None)
    assert style["txt"].decode() == "style"
    for rel, caption in (("1_dog/r1.jpg", "dog"), ("1_dog/r2.png", "a photo of a dog")):
        meta = samples[rel]["meta"]
        assert (meta["is_reg"], meta["subject"], meta["class"], meta["repeats"]) == (True, None, "dog", 1)
        assert samples[rel]["txt"].decode() == caption

    assert _tree_hash(train, reg) == before  # the sources were only read


def test_overwrite_and_interrupted_runs(tree, tmp_path, monkeypatch):
    train, reg, before = tree
    out = tmp_path / "out"
    prepare([str(train)], out=str(out), reg_dir=str(reg), **SETTINGS)
    first = (out / "train-000000.tar").read_bytes()

    with pytest.raises(LorafitError, match=f"{out}.* is not empty.*--overwrite"):
        prepare([str(train)], out=str(out), **SETTINGS)

    (out / "keep.me").write_text("not ours")
    summary = prepare(
        [str(train)],
        out=str(out),
        reg_dir=str(reg),
        overwrite=True,
        drop_small=True,
        max_samples_per_shard=4,
        **SETTINGS,
    )
    assert (summary["samples_written"], summary["reported_skips"]) == (12, 7)
    assert "dropped because drop_small" in _report_line((out / "report.md").read_text(), "tiny.png")
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    assert summary["shard_pattern"] == "train-{000000..000002}.tar"
    assert len(_read_shards(out)) == 12

    # Overwrite removes the stale shards, leaves foreign files, and the same input gives the same bytes.
    prepare([str(train)], out=str(out), reg_dir=str(reg), overwrite=True, **SETTINGS)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == first
    assert (out / "keep.me").read_text() == "not ours"

    # A run that dies half-way leaves no dataset.json, even over a finished dataset.
    calls = {"n": 0}
    real = prepare_write.prepare_file

    def dies_on_fifth(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(prepare_write, "prepare_file", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(train)], out=str(out), overwrite=True, **SETTINGS)
    assert not (out / "dataset.json").exists()
    assert _tree_hash(train, reg) == before


def test_layout_and_setting_errors(tree, tmp_path):
    train, _reg, _ = tree
    with pytest.raises(LorafitError, match="--out .* is inside SRC folder"):
        prepare(str(train), out=str(train / "shards"), **SETTINGS)
    assert not (train / "shards").exists()
    with pytest.raises(LorafitError, match="overlap"):
        prepare(str(train), out=str(tmp_path / "o"), reg_dir=str(train / "1_style"), **SETTINGS)
    with pytest.raises(LorafitError, match="does not exist"):
        prepare(str(tmp_path / "missing"), out=str(tmp_path / "o"), **SETTINGS)
    with pytest.raises(LorafitError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        prepare(str(tmp_path / "empty"), out=str(tmp_path / "o"), **SETTINGS)
    with pytest.raises(LorafitError, match="alpha_background"):
        prepare(str(train), out=str(tmp_path / "o"), alpha_background="not-a-colour", **SETTINGS)
    assert not (tmp_path / "o").exists()  # settings are checked before anything is written


def test_no_upscale_and_byte_sized_shards(tree, tmp_path):
    train, _reg, _ = tree
    out = tmp_path / "out"
    summary = prepare(
        str(train), out=str(out), bucket_no_upscale=True, alpha_background="#000000", max_shard_bytes=1, **SETTINGS
    )
    assert len(summary["shards"]) == summary["samples_written"] == 11  # 1 byte: one sample per shard
    samples = _read_shards(out)
    for sample in samples.values():
        meta = sample["meta"]
        assert meta["bucket"][0] <= meta["w"] and meta["bucket"][1] <= meta["h"]
        assert meta["bucket"][0] * meta["bucket"][1] <= 512 * 512
    corner = Image.open(io.BytesIO(samples["10_ohwx dog/alpha.png"]["png"])).getpixel((5, 5))
    assert corner == (0, 0, 0)


def test_prepare_as_a_command(tree, tmp_path, capsys):
    train, reg, _ = tree
    out = tmp_path / "out"
    args = [
        str(train),
        "--out",
        str(out),
        "--reg_dir",
        str(reg),
        "--resolution",
        "512",
        "--max_bucket_reso",
        "1024",
        "--max_samples_per_shard",
        "5",
        "--caption_ext",
        "txt",
    ]
    summary = auto_cli(prepare, args=args, as_positional=True, parser_mode="yaml")
    assert (summary["samples_written"], len(summary["shards"])) == (13, 3)
    assert summary["settings"]["caption_ext"] == ".txt"

    several = auto_cli(
        prepare, args=[f"[{train},{reg}]", "--out", str(tmp_path / "o2")], as_positional=True, parser_mode="yaml"
    )
    assert several["samples_written"] == 13 and several["reg_samples"] == 0

    with pytest.raises(SystemExit) as exit_info:
        auto_cli(prepare, args=["--help"], as_positional=True, parser_mode="yaml")
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "src",
        "--out OUT",
        "--reg_dir",
        "Regularization folder(s)",
        "--fit_config",
        "--drop_small",
        "--bucket_no_upscale",
        "--alpha_background",
        "--overwrite",
        "else 1024",
    ):
        assert expected in help_text, expected
    assert os.listdir(out)  # the command wrote its dataset
