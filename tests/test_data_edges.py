"""Data edges a careless user or a hostile folder produces: absurd repeat counts, misnamed folders,
symlinks out of the tree and in loops, captions in other encodings or longer than CLIP reads,
duplicates with different captions, and a dataset where nothing is usable."""

from __future__ import annotations

import codecs
import json
import logging
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from lorafit.data.caption_files import decode_caption
from lorafit.data.datamodule import LoraDataModule
from lorafit.data.kohya_folders import MAX_REPEATS, scan_image_folder, scan_tree
from lorafit.data.prepare import prepare
from lorafit.errors import LorafitError

SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


def _png(path: Path, color=(10, 200, 30), size=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _skip_reason(summary: dict, name: str) -> str:
    (entry,) = [e for e in summary["skipped"] if Path(e["path"]).name == name]
    return entry["reason"]


def _notes(summary: dict, name: str) -> str:
    return " ".join(n for e in summary["fixed"] if Path(e["path"]).name == name for n in e["notes"])


# ----------------------------------------------------------------------------- repeat counts and folder names


def test_an_absurd_repeat_count_is_refused_naming_the_folder_before_anything_is_planned(tmp_path):
    _png(tmp_path / "train" / "99999999999_x" / "a.png").with_suffix(".txt").write_text("x")
    started = time.monotonic()
    for scan in (scan_tree, scan_image_folder):
        with pytest.raises(LorafitError) as err:
            scan(tmp_path / "train")
        message = str(err.value)
        assert "99999999999_x asks for 99999999999 repeats" in message and f"limit of {MAX_REPEATS}" in message
        assert "\n" not in message
    with pytest.raises(LorafitError, match="99999999999_x asks for"):
        prepare(str(tmp_path / "train"), out=str(tmp_path / "out"), **SMALL)
    assert not (tmp_path / "out").exists()
    data = LoraDataModule(train_dir=str(tmp_path / "train"), cache_dir=str(tmp_path / "cache"), **SMALL)
    with pytest.raises(LorafitError, match="99999999999_x asks for"):
        data.prepare_data()
    assert time.monotonic() - started < 30  # was: a MemoryError after a minute and 4.7 GB


def test_a_repeat_count_at_the_limit_is_accepted(tmp_path):
    _png(tmp_path / f"{MAX_REPEATS}_x" / "a.png").with_suffix(".txt").write_text("x")
    assert scan_tree(tmp_path).records[0].repeats == MAX_REPEATS


def test_data_repeats_is_bounded_too(tmp_path):
    _png(tmp_path / "1_x" / "a.png")
    with pytest.raises(LorafitError, match=f"data.repeats is {MAX_REPEATS + 1}"):
        LoraDataModule(train_dir=str(tmp_path), repeats=MAX_REPEATS + 1)


def test_misnamed_folders_are_skipped_with_the_right_reason(tmp_path):
    train = tmp_path / "train"
    _png(train / "abc_x" / "a.png")
    _png(train / "7_" / "b.png")
    _png(train / "7_" / "c.png").with_suffix(".txt").write_text("a captioned picture")
    _png(train / "loose.png")
    summary = prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    assert "folder ('abc_x' is not one: it does not start with a repeat count)" in _skip_reason(summary, "a.png")
    assert "its folder '7_' has a repeat count but no trigger/class" in _skip_reason(summary, "b.png")
    assert "rename the folder like '7_ohwx dog'" in _skip_reason(summary, "b.png")
    assert "is in no 'N_<trigger> <class>' folder to take" in _skip_reason(summary, "loose.png")
    assert summary["samples_written"] == 1

    _png(train / "-3_x" / "d.png").with_suffix(".txt").write_text("x")
    with pytest.raises(LorafitError, match="-3_x asks for -3 repeats"):
        prepare(str(train), out=str(tmp_path / "out2"), **SMALL)


# ----------------------------------------------------------------------------- symlinks


def test_symlinks_out_of_the_tree_are_followed_and_reported_and_loops_are_reported(tmp_path, caplog):
    train, outside = tmp_path / "train", tmp_path / "elsewhere"
    _png(train / "5_ohwx dog" / "a.png").with_suffix(".txt").write_text("ohwx dog")
    _png(outside / "b.png", color=(7, 7, 7)).with_suffix(".txt").write_text("ohwx dog, from elsewhere")
    _png(outside / "single.png", color=(1, 2, 3)).with_suffix(".txt").write_text("ohwx dog, linked file")
    (train / "5_ohwx dog" / "linked").symlink_to(outside, target_is_directory=True)
    (train / "5_ohwx dog" / "one.png").symlink_to(outside / "single.png")
    (train / "5_ohwx dog" / "one.txt").write_text("ohwx dog, one")
    (train / "5_ohwx dog" / "loop").symlink_to(train / "5_ohwx dog", target_is_directory=True)

    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        summary = prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    links = {Path(e["path"]).name: e for e in summary["links"]}
    assert set(links) == {"linked", "one.png", "loop"}
    assert links["linked"]["target"] == str(outside.resolve())
    assert links["linked"]["problem"] == "leads outside the dataset folder; followed"
    assert links["one.png"]["problem"] == "leads outside the dataset folder; followed"
    assert links["loop"]["problem"] == "loops back to its own parent folder; not followed"
    assert summary["samples_written"] == 3  # a.png, linked/b.png, one.png; the loop is read once
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Symlinks leading outside the dataset folder or looping (3)" in report
    assert f"-> {outside.resolve()}: leads outside the dataset folder; followed" in report
    assert any("3 symlinks lead outside the dataset folder or loop" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "data,text,encoding",
    [
        ("ohwx café, naïve".encode(), "ohwx café, naïve", "utf-8"),
        (codecs.BOM_UTF8 + "ohwx café".encode(), "ohwx café", "utf-8-sig"),
        ("ohwx café".encode("utf-16"), "ohwx café", "utf-16"),  # Notepad's "Unicode": BOM + UTF-16 LE
        ("ohwx café".encode("utf-16-le"), "ohwx café", "utf-16-le"),  # PowerShell without a mark
        ("ohwx café".encode("utf-16-be"), "ohwx café", "utf-16-be"),
        ("ohwx café, “quoted”".encode("cp1252"), "ohwx café, “quoted”", "cp1252"),
        (b"ohwx caf\xe9 \x81", "ohwx café \x81", "latin-1"),  # 0x81 is undefined in Windows-1252
    ],
)
def test_caption_encodings_are_decoded(data, text, encoding):
    decoded = decode_caption(data, "x.txt")
    assert (decoded.text, decoded.encoding) == (text, encoding)


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary", codecs.BOM_UTF16_LE + b"abc"])
def test_binary_caption_files_are_refused_with_their_name(data):
    with pytest.raises(LorafitError, match=r"caption file x\.txt .*re-save it as UTF-8"):
        decode_caption(data, "x.txt")


def test_prepare_reads_other_encodings_and_says_so(tmp_path):
    train = tmp_path / "train"
    _png(train / "1_x" / "latin.png").with_suffix(".txt").write_bytes("ohwx café".encode("latin-1"))
    _png(train / "1_x" / "wide.png", color=(9, 9, 9)).with_suffix(".txt").write_bytes("ohwx naïve".encode("utf-16"))
    _png(train / "1_x" / "plain.png", color=(99, 9, 9)).with_suffix(".txt").write_text("ohwx plain")
    summary = prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    assert summary["samples_written"] == 3
    assert "read as Windows-1252 (Latin-1)" in _notes(summary, "latin.png")
    assert "read as UTF-16" in _notes(summary, "wide.png")
    assert _notes(summary, "plain.png") == ""
    assert summary["ss_tag_frequency"]["1_x"] == {"ohwx café": 1, "ohwx naïve": 1, "ohwx plain": 1}


def test_duplicates_say_which_caption_was_dropped(tmp_path):
    train = tmp_path / "train"
    first = _png(train / "1_x" / "a.png")
    first.with_suffix(".txt").write_text("ohwx, red collar")
    (train / "1_x" / "b.png").write_bytes(first.read_bytes())
    (train / "1_x" / "b.txt").write_text("ohwx, sitting on grass")
    (train / "1_x" / "c.png").write_bytes(first.read_bytes())
    (train / "1_x" / "c.txt").write_text("ohwx, red collar")
    summary = prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    reason = _skip_reason(summary, "b.png")
    assert f"exact duplicate of {first}" in reason
    assert "kept the first copy only with its caption 'ohwx, red collar'" in reason
    assert "this copy's caption 'ohwx, sitting on grass' was dropped" in reason
    assert _skip_reason(summary, "c.png").endswith("(same caption)")


def test_captions_longer_than_clip_reads_are_counted_with_the_models_tokenizer(tiny_models, tmp_path, caplog):
    train = tmp_path / "train"
    _png(train / "1_x" / "short.png").with_suffix(".txt").write_text("ohwx dog")
    long_caption = ", ".join(f"tag{i}" for i in range(60))
    _png(train / "1_x" / "long.png", color=(5, 5, 5)).with_suffix(".txt").write_text(long_caption)
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        summary = prepare(str(train), out=str(tmp_path / "out"), tokenizer=tiny_models["sd1"], **SMALL)
    assert summary["settings"]["caption_token_limit"] == 75
    ((entry),) = summary["long_captions"]
    assert Path(entry["path"]).name == "long.png" and entry["tokens"] > 75
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Captions longer than 75 tokens (1; training cuts the rest)" in report
    assert any("1 captions are longer than 75 tokens" in r.getMessage() for r in caplog.records)
    # kohya's max_token_length 225 reads it whole.
    wide = prepare(
        str(train), out=str(tmp_path / "o2"), tokenizer=tiny_models["sd1"], max_token_length=225 * 4, **SMALL
    )
    assert wide["long_captions"] == []
    # Without a tokenizer the report says the check was not made.
    prepare(str(train), out=str(tmp_path / "o3"), **SMALL)
    report = (tmp_path / "o3" / "report.md").read_text()
    assert "Not checked: give --tokenizer MODEL or --fit_config FIT.yaml." in report


# ----------------------------------------------------------------------------- settings from a fit config


def _toy_tree(root: Path) -> Path:
    for i in range(3):
        _png(root / "20_ohwx" / f"{i}.png", color=(40 * i, 0, 0), size=(32, 32)).with_suffix(".txt").write_text(
            "a red ohwx on a blue background"
        )
    return root


def test_a_fit_config_gives_the_bucket_settings_and_small_pictures_become_a_note(tiny_models, tmp_path, caplog):
    train = _toy_tree(tmp_path / "toy")
    config = tmp_path / "fit.yaml"
    config.write_text(
        f"model:\n  model: {tiny_models['sd1']}\n"
        "data:\n  train_dir: toy\n  resolution: 32\n  min_bucket_reso: 16\n  bucket_reso_steps: 16\n"
    )
    summary = prepare(str(train), out=str(tmp_path / "out"), fit_config=str(config))
    settings = summary["settings"]
    assert (settings["resolution"], settings["min_bucket_reso"], settings["bucket_reso_steps"]) == (32, 16, 16)
    assert settings["max_bucket_reso"] == 1024  # not in the config: the data module's default, what fit uses
    assert settings["tokenizer"] == tiny_models["sd1"]
    assert summary["fixed"] == []  # 32 px pictures fit the config's buckets

    # A flag beats the config; a size the user chose makes small pictures a note, not a warning.
    flags = dict(fit_config=str(config), min_bucket_reso=64, resolution=64)
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        chosen = prepare(str(train), out=str(tmp_path / "o2"), **flags)
    assert chosen["settings"]["min_bucket_reso"] == 64
    assert "note: 32x32 is below the smallest bucket side you chose" in _notes(chosen, "0.png")
    assert not any("smaller than the smallest bucket side" in r.getMessage() for r in caplog.records)

    # prepare's own defaults (1024 px) flag them, and say how to prepare for the size trained at.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        default = prepare(str(train), out=str(tmp_path / "o3"))
    assert "of prepare's default settings" in _notes(default, "0.png")
    (warning,) = [r.getMessage() for r in caplog.records if "smaller than the smallest bucket side" in r.getMessage()]
    assert warning.startswith("3 images are smaller") and "pass --fit_config with your fit config" in warning


def test_a_config_that_cannot_be_read_is_one_line(tmp_path):
    train = _toy_tree(tmp_path / "toy")
    with pytest.raises(LorafitError, match="--fit_config .*nope.yaml: cannot read it"):
        prepare(str(train), out=str(tmp_path / "out"), fit_config=str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(LorafitError, match="bad.yaml is not YAML"):
        prepare(str(train), out=str(tmp_path / "out"), fit_config=str(tmp_path / "bad.yaml"))


def test_reg_is_the_old_spelling_of_reg_dir(tmp_path, caplog):
    train = _toy_tree(tmp_path / "toy")
    _png(tmp_path / "reg" / "1_shape" / "r.png", size=(32, 32))
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        summary = prepare(str(train), out=str(tmp_path / "out"), reg=str(tmp_path / "reg"), **SMALL)
    assert summary["reg_samples"] == 1
    assert "--reg is now spelled --reg_dir, as data.reg_dir (the old spelling still works)" in caplog.text
    with pytest.raises(LorafitError, match="--reg_dir"):
        prepare(str(train), out=str(tmp_path / "o2"), reg=str(tmp_path / "reg"), reg_dir=str(tmp_path / "reg"))


# ----------------------------------------------------------------------------- nothing usable, staging


def test_nothing_usable_says_why_in_the_one_line_error(tmp_path):
    train = tmp_path / "train"
    _png(train / "plain" / "a.png")
    _png(train / "plain" / "b.png", color=(1, 1, 1))
    (train / "plain" / "c.png").write_bytes(b"")
    (train / "plain" / "c.txt").write_text("a caption of an empty file")
    with pytest.raises(LorafitError) as err:
        prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    message = str(err.value)
    assert message.startswith(f"none of the 3 images in {train} could be used: ")
    assert "2 have no caption and no 'N_<trigger> <class>' folder name to take one from; 1 are empty files" in message
    assert f"see {tmp_path / 'out' / 'report.md'}" in message and "\n" not in message


def test_the_data_module_prepares_in_a_staging_folder_that_never_stays_behind(tmp_path, caplog):
    cache = tmp_path / "cache"
    bad = tmp_path / "bad"
    _png(bad / "plain" / "a.png")
    data = LoraDataModule(train_dir=str(bad), cache_dir=str(cache), **SMALL)
    with pytest.raises(LorafitError) as err:
        data.prepare_data()
    assert "1 have no caption and no 'N_<trigger> <class>' folder name" in str(err.value)
    assert "report.md" not in str(err.value)  # the staging folder and its report are gone
    assert os.listdir(cache / "prepared") == []

    good = _toy_tree(tmp_path / "good")
    data = LoraDataModule(train_dir=str(good), cache_dir=str(cache), **SMALL)
    with caplog.at_level(logging.INFO, logger="lorafit.data"):
        data.prepare_data()
    (prepared,) = (cache / "prepared").iterdir()
    assert (prepared / "dataset.json").is_file() and ".tmp" not in prepared.name
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"see {prepared / 'report.md'}" in logged and ".tmp" not in logged


def test_the_steps_plan_write_and_report_work_alone(tmp_path):
    from lorafit.data.prepare_plan import DEFAULTS, plan_prepare
    from lorafit.data.prepare_report import PrepareTally
    from lorafit.data.prepare_write import finish, write_shards

    train = _toy_tree(tmp_path / "toy")
    out = tmp_path / "out"
    values = {**DEFAULTS, **SMALL, "drop_small": False, "alpha_background": "white"}
    values.update(max_samples_per_shard=2, max_shard_bytes=1 << 20)
    plan = plan_prepare(str(train), out, None, values, size_chosen=True)
    assert plan.image_count == 3 and not out.exists()  # planning writes nothing

    out.mkdir()
    tally = PrepareTally()
    shards, index = write_shards(plan, out, tally)
    assert [s["samples"] for s in shards] == [2, 1] and tally.samples_written == 3
    assert not (out / "dataset.json").exists()  # the shards alone do not claim a finished dataset

    summary = finish(plan, tally, shards, index, out, out)
    assert json.loads((out / "dataset.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "report.md").is_file() and (out / "index.json").is_file()


# ----------------------------------------------------------------------------- epoch size


def test_a_batch_larger_than_the_epoch_is_refused(tmp_path):
    train = _toy_tree(tmp_path / "toy")  # 3 pictures x 20 repeats
    data = LoraDataModule(train_dir=str(train), cache_dir=str(tmp_path / "cache"), batch_size=100, **SMALL)
    data.prepare_data()
    with pytest.raises(LorafitError) as err:
        data.setup("fit")
    assert str(err.value) == (
        "data.batch_size 100 is larger than the 60 samples per epoch (data.train_dir, repeats included), so no "
        "batch would be that large; set data.batch_size to at most 60"
    )
    fits = LoraDataModule(train_dir=str(train), cache_dir=str(tmp_path / "cache"), batch_size=60, **SMALL)
    fits.setup("fit")
    assert len(fits.train_dataloader()) == 1


def test_an_epoch_too_large_to_plan_is_refused(tmp_path, monkeypatch):
    import lorafit.data.epoch_checks as epoch_checks

    monkeypatch.setattr(epoch_checks, "MAX_SAMPLES_PER_EPOCH", 59)
    data = LoraDataModule(train_dir=str(_toy_tree(tmp_path / "toy")), cache_dir=str(tmp_path / "cache"), **SMALL)
    data.prepare_data()
    with pytest.raises(LorafitError, match="data.train_dir: 60 samples per epoch .* more than lorafit plans"):
        data.setup("fit")


def test_a_decompression_bomb_is_skipped_without_decoding_it(tmp_path):
    """A PNG whose header claims 20000 x 20000 pixels (1.2 GB of RGB) is refused from its header."""
    import struct
    import zlib

    train = tmp_path / "train"
    small = _png(train / "1_x" / "bomb.png", size=(1, 1))
    data = bytearray(small.read_bytes())
    header = struct.pack(">II", 20000, 20000) + bytes(data[24:29])  # width, height, then depth .. interlace
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    small.write_bytes(bytes(data))
    small.with_suffix(".txt").write_text("ohwx")
    _png(train / "1_x" / "fine.png").with_suffix(".txt").write_text("ohwx")
    summary = prepare(str(train), out=str(tmp_path / "out"), **SMALL)
    assert "too large to decode safely" in _skip_reason(summary, "bomb.png")
    assert summary["samples_written"] == 1


@pytest.mark.slow
def test_a_full_disk_during_prepare_is_one_line_and_claims_no_finished_dataset(tmp_path):
    import resource
    import subprocess

    import numpy as np
    from cli_runs import lorafit_command, lorafit_env

    train = tmp_path / "train" / "1_x"
    train.mkdir(parents=True)
    for i in range(6):  # noise: ~12 kB per PNG, so the shard outgrows the limit
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(train / f"{i}.png")
        (train / f"{i}.txt").write_text("ohwx")
    out = tmp_path / "out"

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    result = subprocess.run(
        lorafit_command(
            "prepare", str(tmp_path / "train"), "--out", str(out), "--resolution", "64", "--min_bucket_reso", "64"
        ),
        env=lorafit_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limited,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lorafit: error: cannot write a file in {out} (File too large): raise the file-size"), last
    assert last.endswith("holds no dataset.json, so nothing takes it for a prepared dataset; run prepare again")
    assert "Traceback" not in result.stderr and not (out / "dataset.json").exists()


def test_the_command_line_reads_the_fit_config(tmp_path):
    from lorafit.cli import main

    train = _toy_tree(tmp_path / "toy")
    config = tmp_path / "fit.yaml"
    config.write_text("data:\n  resolution: 32\n  min_bucket_reso: 16\n  bucket_reso_steps: 16\n")
    main(["prepare", str(train), "--out", str(tmp_path / "out"), "--fit_config", str(config)])
    settings = json.loads((tmp_path / "out" / "dataset.json").read_text())["settings"]
    assert (settings["resolution"], settings["min_bucket_reso"]) == (32, 16)


def test_a_users_reload_dataloaders_setting_is_replaced_with_a_warning(tmp_path, caplog):
    """Epochs differ in length, so the loader is rebuilt every epoch; a value the user set is not dropped unseen."""
    import lightning.pytorch as pl

    train = _toy_tree(tmp_path / "toy")
    data = LoraDataModule(train_dir=str(train), cache_dir=str(tmp_path / "cache"), batch_size=4, **SMALL)
    data.trainer = pl.Trainer(reload_dataloaders_every_n_epochs=3, logger=False, enable_progress_bar=False)
    data.prepare_data()
    with caplog.at_level(logging.WARNING, logger="lorafit.data"):
        data.setup("fit")
    assert data.trainer.reload_dataloaders_every_n_epochs == 1
    assert [
        r.getMessage() for r in caplog.records if "reload_dataloaders_every_n_epochs 3 is taken as 1" in r.getMessage()
    ]
