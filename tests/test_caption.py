"""`lorafit caption`: tiny random-weight BLIP and WD14-format tagger, built offline, on kohya trees."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from caption_models import BLIP_WORDS, save_tiny_blip, save_tiny_tagger
from cli_runs import run_lorafit
from PIL import Image
from review_fixtures import request, running_server

from lorafit.captioning.caption import caption
from lorafit.captioning.tags import is_emoticon_tag, join_tags, tag_frequency, tag_to_prompt, with_prefix
from lorafit.errors import LorafitError

RATINGS = {"general", "sensitive", "questionable", "explicit"}


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return save_tiny_tagger(tmp_path_factory.mktemp("tagger") / "wd-tiny-tagger")


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


def _solid(path: Path, colour, size=(40, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:200])  # header survives, pixel data cut off
    return path


def _tree(root: Path) -> Path:
    """A kohya tree: two concept folders, a nested folder, a loose image, a corrupt JPEG, one caption."""
    _solid(root / "10_ohwx dog" / "red.png", (220, 20, 20))
    _solid(root / "10_ohwx dog" / "closeups" / "green.jpg", (20, 220, 20), size=(24, 40))
    _solid(root / "1_dog" / "done.png", (20, 20, 220))
    (root / "1_dog" / "done.txt").write_text("my own careful caption\n")
    _solid(root / "loose.webp", (220, 20, 20))
    _truncated_jpeg(root / "10_ohwx dog" / "broken.jpg")
    return root


def _captions(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def test_tagger_captions_every_image_of_a_tree_skips_existing_and_reports_a_corrupt_one(tagger, tmp_path, capsys):
    root = _tree(tmp_path / "train")
    result = caption(
        str(root), model=str(tagger), prefix="ohwx dog,", remove_tags="outdoors, long_hair", batch_size=2, device="cpu"
    )
    out = capsys.readouterr().out

    captions = _captions(root)
    assert set(captions) == {"10_ohwx dog/red.txt", "10_ohwx dog/closeups/green.txt", "1_dog/done.txt", "loose.txt"}
    assert captions["1_dog/done.txt"] == "my own careful caption\n"  # skipped: never destroy user work
    assert not list(root.rglob("*.bak"))
    red = captions["10_ohwx dog/red.txt"].strip().split(", ")
    green = captions["10_ohwx dog/closeups/green.txt"].strip().split(", ")
    assert red[0] == "ohwx dog" and green[0] == "ohwx dog"
    # The tagger reads BGR: red pixels must fire "dog", green ones "grass" (a channel swap would flip them).
    assert "dog" in red and "grass" not in red
    assert "grass" in green and "dog" not in green
    for tags in (red, green):
        assert "^_^" in tags and "solo" in tags and "ohwx character" in tags  # emoticon kept, _ -> space
        assert not RATINGS & set(tags), "rating tags must never be written"
        assert "long hair" not in tags and "outdoors" not in tags  # --remove_tags in either spelling
    assert result["written"] == 3 and result["skipped_existing"] == 1
    assert [Path(image).name for image, _ in result["failed"]] == ["broken.jpg"]
    assert re.search(r"failed: .*broken\.jpg.*(truncated|corrupt)", out)
    assert re.search(r"\b3\s+100\.0%\s+solo\b", out)  # the tag-frequency summary


def test_thresholds_choose_which_tags_are_written(tagger, tmp_path):
    image = _solid(tmp_path / "data" / "a.png", (220, 20, 20))
    caption(str(image.parent), model=str(tagger), character_threshold=0.9, general_threshold=0.99, device="cpu")
    tags = image.with_suffix(".txt").read_text().strip().split(", ")
    assert "ohwx character" not in tags  # p = 0.5 < 0.9
    assert "solo" in tags and "dog" in tags  # p > 0.99
    assert "grass" not in tags


def test_overwrite_and_append_keep_the_previous_text_as_bak(tagger, tmp_path):
    root = tmp_path / "data"
    image = _solid(root / "5_ohwx dog" / "a.png", (220, 20, 20))
    sidecar = image.with_suffix(".txt")
    sidecar.write_text("ohwx dog, my tag, solo\n")

    caption(str(root), model=str(tagger), mode="append", prefix="ohwx dog,", device="cpu")
    appended = sidecar.read_text().strip().split(", ")
    assert appended[:3] == ["ohwx dog", "my tag", "solo"]  # user text first, untouched
    assert appended.count("solo") == 1 and appended.count("ohwx dog") == 1 and "dog" in appended
    assert Path(str(sidecar) + ".bak").read_text() == "ohwx dog, my tag, solo\n"

    caption(str(root), model=str(tagger), mode="overwrite", device="cpu")
    assert "my tag" not in sidecar.read_text()
    assert "my tag" in Path(str(sidecar) + ".bak").read_text()

    # Everything captioned: the default mode has nothing to do and never even loads the model.
    before = sidecar.read_text()
    result = caption(str(root), model=str(tmp_path / "no-such-model"))
    assert result["written"] == 0 and result["skipped_existing"] == 1 and sidecar.read_text() == before


def test_append_to_a_caption_in_another_encoding_keeps_its_text(tagger, tmp_path):
    root = tmp_path / "data"
    image = _solid(root / "5_ohwx dog" / "a.png", (220, 20, 20))
    sidecar = image.with_suffix(".txt")
    sidecar.write_bytes("ohwx dog, café\n".encode("latin-1"))  # what training reads as Windows-1252

    caption(str(root), model=str(tagger), mode="append", device="cpu")
    assert sidecar.read_text(encoding="utf-8").startswith("ohwx dog, café, ")
    assert Path(f"{sidecar}.bak").read_text(encoding="utf-8") == "ohwx dog, café\n"


def test_append_adds_to_the_caption_line_and_keeps_the_other_lines_of_the_file(tagger, tmp_path):
    # Training reads the first non-empty line only; the lines around it are the user's notes and stay.
    root = tmp_path / "data"
    image = _solid(root / "5_ohwx dog" / "a.png", (220, 20, 20))
    sidecar = image.with_suffix(".txt")
    original = b"\r\nmy tag, solo\r\nA red dog on a white floor, for a sentence caption later.\r\n\r\nnote: crop it\r\n"
    sidecar.write_bytes(original)

    caption(str(root), model=str(tagger), mode="append", prefix="ohwx dog,", device="cpu")
    lines = sidecar.read_bytes().split(b"\r\n")
    assert lines[0] == b"" and lines[2:] == [
        b"A red dog on a white floor, for a sentence caption later.",
        b"",
        b"note: crop it",
        b"",
    ]
    tags = lines[1].decode().split(", ")
    assert tags[:3] == ["ohwx dog", "my tag", "solo"] and "dog" in tags and tags.count("solo") == 1
    assert Path(f"{sidecar}.bak").read_bytes() == original
    # What training reads: the caption line, with the new tags.
    from lorafit.data.kohya_folders import read_caption

    assert read_caption(sidecar) == lines[1].decode()


@pytest.mark.slow
def test_blip_captions_through_the_cli_with_progress_and_summary(blip, tmp_path):
    root = _tree(tmp_path / "train")
    # Dashed spellings (as the issue writes them) work as well as the parameter names.
    result = run_lorafit(
        "caption",
        str(root),
        "--model",
        str(blip),
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--caption-ext",
        ".caption",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = {p.relative_to(root).as_posix(): p.read_text().strip() for p in root.rglob("*.caption")}
    assert set(written) == {
        "10_ohwx dog/red.caption",
        "10_ohwx dog/closeups/green.caption",
        "1_dog/done.caption",
        "loose.caption",
    }  # done.txt is a .txt caption: with .caption the image is uncaptioned
    for text in written.values():
        assert text and set(text.split()) <= set(BLIP_WORDS), text
    assert "broken.jpg" in result.stdout and "captioned 4 images" in result.stdout
    assert "captioning (image-to-text)" in result.stderr and "4/5" not in result.stdout  # tqdm on stderr
    assert (root / "1_dog" / "done.txt").read_text() == "my own careful caption\n"


def test_cli_remove_tags_repeats_and_accepts_lists(tagger, tmp_path):
    image = _solid(tmp_path / "data" / "a.png", (220, 20, 20))
    result = run_lorafit(
        "caption",
        str(image.parent),
        "--model",
        str(tagger),
        "--prefix",
        "ohwx dog,",
        "--remove_tags",
        "solo",
        "--remove-tags",
        "long_hair, ^_^",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert image.with_suffix(".txt").read_text() == "ohwx dog, ohwx character, dog\n"


def test_a_prepare_output_folder_stands_for_its_source_folders(tagger, tmp_path, capsys):
    from lorafit.data.prepare import prepare

    root = tmp_path / "train"
    _solid(root / "3_ohwx dog" / "a.png", (220, 20, 20), size=(64, 64))
    (root / "3_ohwx dog" / "a.txt").write_text("old\n")
    _solid(root / "3_ohwx dog" / "b.png", (20, 220, 20), size=(64, 64))
    prepare(str(root), out=str(tmp_path / "shards"), resolution=64, min_bucket_reso=32, max_bucket_reso=128)
    capsys.readouterr()

    caption(str(tmp_path / "shards"), model=str(tagger), device="cpu")
    assert (root / "3_ohwx dog" / "a.txt").read_text() == "old\n"
    assert "grass" in (root / "3_ohwx dog" / "b.txt").read_text()
    assert "--overwrite" in capsys.readouterr().out  # tells the user to re-shard
    assert not list((tmp_path / "shards").glob("*.txt"))

    # The review page on the prepared folder shows (and edits) the source images, and says so.
    with running_server(tmp_path / "shards") as server:
        status, body = request(server, "GET", "/api/items")
    assert status == 200 and [item["id"] for item in body["items"]] == ["0/3_ohwx dog/a.png", "0/3_ohwx dog/b.png"]
    assert "--overwrite" in body["reminder"]


def test_bad_tagger_files_get_one_line_errors(tagger, tmp_path):
    broken = tmp_path / "tagger"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n1,dog,0,5\n")
    _solid(tmp_path / "data" / "a.png", (1, 2, 3))
    with pytest.raises(LorafitError, match="predicts 11 tags but selected_tags.csv lists 1"):
        caption(str(tmp_path / "data"), model=str(broken), device="cpu")
    (broken / "selected_tags.csv").write_text("id,tag\n1,dog\n")
    with pytest.raises(LorafitError, match="tag_id,name,category,count"):
        caption(str(tmp_path / "data"), model=str(broken), device="cpu")
    with pytest.raises(LorafitError, match="does not exist"):
        caption(str(tmp_path / "nowhere"), model=str(tagger))


def test_tag_spelling_rules():
    assert [tag_to_prompt(t) for t in ("long_hair", "^_^", "o_o", "(o)_(o)", "||_||", "no_bra", "6_9")] == [
        "long hair",
        "^_^",
        "o_o",
        "(o)_(o)",
        "||_||",
        "no bra",
        "6_9",
    ]
    assert not is_emoticon_tag("hair_bun") and is_emoticon_tag(">_<")
    assert with_prefix(with_prefix("dog, grass", "ohwx dog,"), "ohwx dog,") == "ohwx dog, dog, grass"
    assert join_tags(["a", "A ", "b", "a"]) == "a, b"
    assert tag_frequency(["a, b", "a, a", "b_c"]) == {"a": 2, "b": 1, "b_c": 1}


def test_caption_and_review_have_help():
    for verb in ("caption", "review"):
        result = run_lorafit(verb, "--help", timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--caption_ext" in result.stdout


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["Salesforce/blip-image-captioning-base", "SmilingWolf/wd-vit-tagger-v3"])
def test_a_hub_model_without_network_or_cache_fails_at_once_in_one_line(model, tmp_path):
    """No network, HF_HUB_OFFLINE unset: the hub client used to retry every file for minutes."""
    _solid(tmp_path / "data" / "a.png", (220, 20, 20))
    no_network = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    result = run_lorafit(
        "caption", str(tmp_path / "data"), "--model", model, timeout=90, HF_HOME=str(tmp_path / "hf"), **no_network
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if "error" in line.lower() or "retry" in line.lower()]
    assert line.startswith(f"lorafit: error: --model {model} is not in the local Hugging Face cache and ")
    assert "cannot be reached" in line
    offline = run_lorafit("caption", str(tmp_path / "data"), "--model", model, HF_HOME=str(tmp_path / "hf"))
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr.splitlines()[-1]
