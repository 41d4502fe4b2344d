"""The minimal data path: kohya folder scanning, robust image loading, the seeded folder DataModule."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorafit.data.demo_dataset import CONCEPT_FOLDER, write_demo_dataset
from lorafit.data.images import load_rgb, resize_center_crop
from lorafit.data.kohya_folders import parse_folder_name, scan_image_folder
from lorafit.errors import LorafitError


def _png(path: Path, color=(128, 64, 32), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _caption(image: Path, text: str, ext: str = ".txt", encoding: str = "utf-8") -> None:
    image.with_name(image.stem + ext).write_text(text, encoding=encoding)


# ----------------------------------------------------------------------------- folder names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10_ohwx dog", (10, "ohwx dog")),
        ("1_dog", (1, "dog")),
        ("3_ohwx_dog", (3, "ohwx_dog")),
        ("007_  spaced out  ", (7, "spaced out")),
        ("10_", (10, None)),
        ("ohwx dog", (None, "ohwx dog")),
        ("closeups", (None, "closeups")),
        ("v2_dog", (None, "v2_dog")),
    ],
)
def test_parse_folder_name(name, expected):
    parsed = parse_folder_name(name)
    assert parsed == expected
    assert (parsed.repeats, parsed.prompt) == expected


# ----------------------------------------------------------------------------- scanning


def test_scan_nested_tree_inherits_repeats_and_prompt(tmp_path):
    a = _png(tmp_path / "10_ohwx dog" / "a.jpg")
    _caption(a, "ohwx dog, running on grass\n")
    b = _png(tmp_path / "10_ohwx dog" / "closeups" / "b.PNG")  # upper-case extension counts
    _caption(b, "ohwx dog, close-up")
    c = _png(tmp_path / "2_cat" / "misc" / "deeper" / "c.webp")
    _caption(c, "a cat")
    d = _png(tmp_path / "loose.png")
    _caption(d, "a loose image")
    _png(tmp_path / ".ipynb_checkpoints" / "x.png")  # hidden folders are not data
    (tmp_path / "10_ohwx dog" / "notes.md").write_text("not an image")

    records = scan_image_folder(tmp_path)

    assert [r.path for r in records] == [a, b, c, d]  # sorted by relative path
    assert [r.repeats for r in records] == [10, 10, 2, 1]
    assert [r.folder_prompt for r in records] == ["ohwx dog", "ohwx dog", "cat", None]
    assert [r.folder for r in records] == ["10_ohwx dog", "10_ohwx dog", "2_cat", tmp_path.name]
    assert [r.caption for r in records] == [
        "ohwx dog, running on grass",
        "ohwx dog, close-up",
        "a cat",
        "a loose image",
    ]


def test_scan_order_is_deterministic(tmp_path):
    for name in ["b.png", "a.png", "c.jpg", "sub/0.png"]:
        _caption(_png(tmp_path / "3_x" / name), "x")
    first = [r.path for r in scan_image_folder(tmp_path)]
    assert first == [r.path for r in scan_image_folder(tmp_path)]
    relative = [p.relative_to(tmp_path).as_posix() for p in first]
    assert relative == ["3_x/a.png", "3_x/b.png", "3_x/c.jpg", "3_x/sub/0.png"]


def test_missing_captions_fall_back_to_folder_prompt_with_one_warning(tmp_path, caplog):
    captioned = _png(tmp_path / "5_ohwx dog" / "a.png")
    _caption(captioned, "ohwx dog, sitting")
    _png(tmp_path / "5_ohwx dog" / "b.png")
    empty = _png(tmp_path / "5_ohwx dog" / "c.png")
    _caption(empty, "  \n\n")  # whitespace-only counts as missing

    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        records = scan_image_folder(tmp_path)

    warnings = [r for r in caplog.records if r.name == "lorafit.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "2 of 3 images" in message and "folder name" in message
    assert "b.png" in message and "c.png" in message
    assert [r.caption for r in records] == ["ohwx dog, sitting", None, None]
    assert [r.training_caption for r in records] == ["ohwx dog, sitting", "ohwx dog", "ohwx dog"]


def test_caption_bom_first_line_and_caption_extension(tmp_path, caplog):
    img = _png(tmp_path / "1_thing" / "a.png")
    _caption(img, "ohwx thing, red\nsecond line is ignored like kohya\n", encoding="utf-8-sig")
    _caption(img, "from the .caption file", ext=".caption")

    assert scan_image_folder(tmp_path)[0].caption == "ohwx thing, red"  # no \ufeff in the prompt
    assert scan_image_folder(tmp_path, caption_ext=".caption")[0].caption == "from the .caption file"
    assert scan_image_folder(tmp_path, caption_ext="caption")[0].caption == "from the .caption file"


def test_captions_in_other_encodings_are_read_with_one_warning(tmp_path, caplog):
    latin = _png(tmp_path / "1_x" / "a.png")
    latin.with_name("a.txt").write_bytes("ohwx caf\xe9".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        (record,) = scan_image_folder(tmp_path)
    assert record.caption == "ohwx café" and record.caption_encoding == "cp1252"
    assert "1 captions are not UTF-8 and were decoded as Windows-1252 (Latin-1)" in caplog.text


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(LorafitError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(LorafitError, match="is a file"):
        scan_image_folder(a_file)

    (tmp_path / "empty" / "10_dog").mkdir(parents=True)
    with pytest.raises(LorafitError, match=r"no images found.*\.jpg.*\.png") as err:
        scan_image_folder(tmp_path / "empty")
    assert "\n" not in str(err.value)

    _png(tmp_path / "orphans" / "plain" / "lonely.png")
    _png(tmp_path / "orphans" / "plain" / "other.png")
    with pytest.raises(LorafitError) as err:
        scan_image_folder(tmp_path / "orphans")
    message = str(err.value)
    assert "lonely.png" in message and "lonely.txt" in message and "N_<trigger> <class>" in message
    assert "1 more" in message and "\n" not in message

    binary = _png(tmp_path / "binary" / "1_x" / "a.png")
    binary.with_name("a.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(LorafitError, match=r"a\.txt cannot be read as text"):
        scan_image_folder(tmp_path / "binary")

    _png(tmp_path / "zero" / "0_dog" / "a.png")
    with pytest.raises(LorafitError, match="0_dog asks for 0 repeats"):
        scan_image_folder(tmp_path / "zero")


# ----------------------------------------------------------------------------- image loading


def test_load_rgb_applies_exif_orientation(tmp_path):
    # Stored 40 wide x 20 high with a red top-left corner; orientation 6 = display rotated 90 degrees
    # clockwise, so the shown image is 20 x 40 and the red corner moves to the top right.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 40)
    r, _g, b = img.getpixel((17, 2))
    assert r > 200 and b < 60
    assert img.getpixel((2, 2))[2] > 200  # the top-left is blue after rotation


def test_load_rgb_composites_transparency_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "cutout.png")
    img = load_rgb(tmp_path / "cutout.png")
    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert load_rgb(tmp_path / "cutout.png", background=(0, 255, 0)).getpixel((4, 4)) == (0, 255, 0)

    # Palette image whose transparency is a tRNS index rather than an alpha band.
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "palette.png", transparency=1)
    assert load_rgb(tmp_path / "palette.png").getpixel((3, 3)) == (255, 255, 255)


def test_load_rgb_converts_cmyk(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # pure red in CMYK
    img = load_rgb(tmp_path / "print.jpg")
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r > 230 and g < 25 and b < 25


def test_load_rgb_scales_16_bit_grayscale(tmp_path):
    Image.fromarray(np.full((6, 6), 32896, dtype=np.uint16)).save(tmp_path / "scan16.png")
    assert Image.open(tmp_path / "scan16.png").mode.startswith("I")  # really stored as 16-bit
    img = load_rgb(tmp_path / "scan16.png")
    # 32896 / 257 = 128; Pillow's plain convert would clip it to 255 (white).
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (128, 128, 128)


def test_load_rgb_takes_first_gif_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert getattr(Image.open(tmp_path / "anim.gif"), "n_frames", 1) == 2
    r, _g, b = load_rgb(tmp_path / "anim.gif").getpixel((4, 4))
    assert r > 200 and b < 50


def test_load_rgb_rejects_truncated_and_non_images(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(LorafitError, match=r"cut\.jpg.*truncated") as err:
        load_rgb(tmp_path / "cut.jpg")
    assert "\n" not in str(err.value)

    (tmp_path / "fake.png").write_text("this is not a png")
    with pytest.raises(LorafitError, match=r"fake\.png is not an image"):
        load_rgb(tmp_path / "fake.png")
    with pytest.raises(LorafitError, match=r"missing\.png"):
        load_rgb(tmp_path / "missing.png")


def test_resize_center_crop_landscape_offsets():
    # 200 x 100, left half black, right half white: short side 100 -> 64, long side 128,
    # crop starts 32 px into the resized image, so the crop is half black, half white.
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))
    pixels, original_size, crop_top_left = resize_center_crop(img, 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert original_size == (100, 200)
    assert crop_top_left == (0, 32)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[:, :, :24].max() < -0.9 and pixels[:, :, 40:].min() > 0.9


def test_resize_center_crop_portrait_and_odd_sizes():
    _, original_size, crop_top_left = resize_center_crop(Image.new("RGB", (30, 77)), 16)
    # 30x77 -> 16 x int(16*77/30)=41; top = round((41-16)/2) = round(12.5) = 12 (Python rounding)
    assert original_size == (77, 30) and crop_top_left == (12, 0)
    _, original_size, crop_top_left = resize_center_crop(Image.new("RGB", (77, 30)), 16)
    assert original_size == (30, 77) and crop_top_left == (0, 12)
    pixels, _, crop = resize_center_crop(Image.new("RGB", (16, 16), (255, 255, 255)), 16)
    assert crop == (0, 0) and torch.allclose(pixels, torch.ones_like(pixels))


def test_demo_dataset_is_deterministic_and_scannable(tmp_path, caplog):
    a = write_demo_dataset(tmp_path / "a", num_images=4, resolution=32, seed=1)
    b = write_demo_dataset(tmp_path / "b", num_images=4, resolution=32, seed=1)
    c = write_demo_dataset(tmp_path / "c", num_images=4, resolution=32, seed=2)
    files = sorted(p.name for p in (a / CONCEPT_FOLDER).iterdir())
    assert files == [f"star_{i:03d}.{ext}" for i in range(4) for ext in ("png", "txt")][:-1]
    for name in files:
        assert (a / CONCEPT_FOLDER / name).read_bytes() == (b / CONCEPT_FOLDER / name).read_bytes()
    first_star = CONCEPT_FOLDER + "/star_000.png"
    assert (a / first_star).read_bytes() != (c / first_star).read_bytes()
    caption = (a / CONCEPT_FOLDER / "star_000.txt").read_text()
    assert caption.startswith("ohwx star, a ") and "yellow star on a" in caption

    img = Image.open(a / CONCEPT_FOLDER / "star_000.png")
    assert img.size == (32, 32)
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    yellowish = (pixels[:, 0] > 200) & (pixels[:, 1] > 170) & (pixels[:, 2] < 80)
    assert 0.02 < yellowish.mean() < 0.6  # a star is drawn, and it is not the whole picture

    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        records = scan_image_folder(a)
    assert [r.repeats for r in records] == [5] * 4
    assert records[-1].caption is None and records[-1].training_caption == "ohwx star"
    assert any("1 of 4 images" in r.getMessage() for r in caplog.records)


def test_demo_dataset_skips_existing_unless_overwrite(tmp_path):
    root = write_demo_dataset(tmp_path / "demo", num_images=2, resolution=16, seed=0)
    marker = root / CONCEPT_FOLDER / "star_000.png"
    marker.write_bytes(b"edited by the user")
    write_demo_dataset(root, num_images=2, resolution=16, seed=0)
    assert marker.read_bytes() == b"edited by the user"
    (root / "keep.txt").write_text("unrelated")
    write_demo_dataset(root, num_images=3, resolution=16, seed=0, overwrite=True)
    assert marker.read_bytes().startswith(b"\x89PNG")
    assert len(list((root / CONCEPT_FOLDER).glob("*.png"))) == 3
    assert (root / "keep.txt").read_text() == "unrelated"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left
