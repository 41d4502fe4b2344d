"""kohya-syntax sample prompts: every option, quoting, comments, errors that name the line."""

from __future__ import annotations

import json

import pytest

from lorafit.errors import LorafitError
from lorafit.inference.prompts import SamplePrompt, collect_prompts, parse_prompt_line, read_prompt_file

PROMPT_FILE = """\
# sample prompts for ohwx dog

a photo of ohwx dog, park --n blurry, cartoon --w 768 --h 640 --s 30 --l 7.5 --d 42 --ss euler_a
   # an indented comment
"ohwx dog --not an option" --n "drawing --x" --d 7

photo, statue, in the style of medieval city, 8K, --w 640--h 768 --s 35 --n Anime, Cartoon
ohwx dog on the moon --ss dpmsolver++ --L 4 --D 3
"""


def test_prompt_file_every_option_quotes_comments_and_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPT_FILE)
    prompts = read_prompt_file(path)
    assert prompts == [
        SamplePrompt("a photo of ohwx dog, park", "blurry, cartoon", 768, 640, 30, 7.5, 42, "euler_a"),
        SamplePrompt("ohwx dog --not an option", "drawing --x", seed=7),
        # The seed-004 guide's line: kohya loses "--h 768" glued to "640"; lorafit reads it.
        SamplePrompt("photo, statue, in the style of medieval city, 8K,", "Anime, Cartoon", 640, 768, 35),
        # kohya's option letters are case-insensitive; its sampler names are accepted.
        SamplePrompt("ohwx dog on the moon", cfg=4.0, seed=3, sampler="dpmpp_2m"),
    ]


def test_defaults_fill_only_unset_fields():
    prompt = parse_prompt_line("ohwx --s 30 --l 0").with_defaults(512, 512, 20, 7.0, 5, "ddim")
    assert prompt == SamplePrompt("ohwx", "", 512, 512, 30, 0.0, 5, "ddim")


def test_words_with_dashes_stay_in_the_prompt():
    assert parse_prompt_line("a well--known dog -- 1990s style").prompt == "a well--known dog -- 1990s style"


@pytest.mark.parametrize(
    "line, message",
    [
        ("ohwx --q 3", "unknown option --q"),
        ("ohwx --w 770", "--w needs a positive multiple of 8"),
        ("ohwx --h tall", "--h needs a whole number"),
        ("ohwx --s 0", "--s needs between 1 and 1000 steps"),
        ("ohwx --l high", "--l needs a number"),
        ("ohwx --d -1", "--d needs a whole number"),
        ("ohwx --s", "--s has no value"),
        ("ohwx --ss warp_drive", "unknown sampler 'warp_drive'"),
        ("ohwx --cn pose.png", "--cn (ControlNet images) is not supported"),
        ("--n blurry", "the prompt text is empty"),
    ],
)
def test_bad_option_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# header\n\nfine prompt --s 20\n{line}\n")
    with pytest.raises(LorafitError) as error:
        read_prompt_file(path)
    assert str(error.value).startswith(f"{path} line 4: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_kohya_toml_and_json_prompt_files(tmp_path):
    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text(
        '[prompt]\nnegative_prompt = "blurry"\nwidth = 512\nheight = 512\nscale = 6\nsample_steps = 25\n\n'
        '[[prompt.subset]]\nprompt = "ohwx dog"\nseed = 1\n\n'
        '[[prompt.subset]]\nprompt = "ohwx dog swimming"\nwidth = 768\nsample_sampler = "k_euler"\n'
    )
    assert read_prompt_file(toml_file) == [
        SamplePrompt("ohwx dog", "blurry", 512, 512, 25, 6.0, 1),
        SamplePrompt("ohwx dog swimming", "blurry", 768, 512, 25, 6.0, sampler="euler"),
    ]
    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps(["ohwx --d 4", {"prompt": "ohwx cat", "scale": 5, "steps": 9}]))
    assert read_prompt_file(json_file) == [SamplePrompt("ohwx", seed=4), SamplePrompt("ohwx cat", cfg=5.0, steps=9)]
    json_file.write_text(json.dumps([{"prompt": "x", "colour": "red"}]))
    with pytest.raises(LorafitError, match=r"prompts.json entry 1: unknown key 'colour'"):
        read_prompt_file(json_file)


def test_config_prompts_then_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("from file --d 2\n")
    prompts = collect_prompts(["inline --d 1", {"prompt": "mapping", "seed": 3}], str(path))
    assert [(p.prompt, p.seed) for p in prompts] == [("inline", 1), ("mapping", 3), ("from file", 2)]
    with pytest.raises(LorafitError, match=r"^samples.prompts\[1\]: unknown option --x"):
        collect_prompts(["ok", "bad --x 1"], None, key="samples.prompts")
    with pytest.raises(LorafitError, match="prompt file .*missing.txt does not exist"):
        collect_prompts([], str(tmp_path / "missing.txt"))
