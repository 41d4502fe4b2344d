"""Sample prompts in kohya's inline syntax, from a config list or a prompt file.

One line is one image request::

    a photo of ohwx dog, park --n blurry, cartoon --w 768 --h 640 --s 30 --l 7.5 --d 42 --ss euler_a

Options (kohya sd-scripts' ``--sample_prompts`` file, same letters, same meaning):
``--n`` negative prompt, ``--w``/``--h`` width/height in pixels, ``--s`` sampling steps,
``--l`` CFG scale, ``--d`` seed, ``--ss`` sampler. Blank lines and lines starting with ``#`` are
skipped. A value may be wrapped in double quotes (``--n "blurry --extra"``), and the prompt too;
inside double quotes `` --`` starts no option.

Where lorafit is stricter than kohya, on purpose: kohya splits on `` --`` and warns about (or
silently drops) what it does not understand, so ``--w 768--h 640`` (seen in a published guide)
loses the height and ``--W 768`` a typo away from the intended option trains with defaults. Here
an option glued to a number is still read, and an unknown option or bad value is a one-line
error naming the file and line. ``.toml`` and ``.json`` prompt files use kohya's keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.inference.samplers import canonical_sampler


@dataclass(frozen=True)
class SamplePrompt:
    """One image request; ``None`` fields take the caller's defaults."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    sampler: str | None = None
    guidance: float | None = None  # guidance-distilled models (Flux.1 [dev]): kohya's --g; None = 3.5

    def with_defaults(self, width: int, height: int, steps: int, cfg: float, seed: int, sampler: str) -> SamplePrompt:
        """A copy with every unset field filled in."""
        return replace(
            self,
            width=self.width or width,
            height=self.height or height,
            steps=self.steps or steps,
            cfg=cfg if self.cfg is None else self.cfg,
            seed=seed if self.seed is None else self.seed,
            sampler=self.sampler or sampler,
        )


# option letter -> (field, converter name); kohya's letters.
_OPTIONS = {
    "n": ("negative_prompt", "text"),
    "w": ("width", "size"),
    "h": ("height", "size"),
    "s": ("steps", "steps"),
    "l": ("cfg", "float"),
    "g": ("guidance", "float"),
    "d": ("seed", "seed"),
    "ss": ("sampler", "sampler"),
}
# kohya options that exist but need inputs lorafit's samplers do not take.
_UNSUPPORTED = {"cn": "ControlNet images", "am": "attention-couple masks"}
# `--name` at the start, after whitespace, or glued to a number ("--w 768--h 640").
_MARKER = re.compile(r"--([A-Za-z]+)(?=\s|$)")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def _markers(line: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of every option marker outside double quotes."""
    quoted = [False] * (len(line) + 1)
    inside = False
    for i, char in enumerate(line):
        if char == '"':
            inside = not inside
        quoted[i] = inside
    found = []
    for match in _MARKER.finditer(line):
        start, name = match.start(), match.group(1).lower()
        if quoted[start]:
            continue
        before = line[start - 1] if start else " "
        if before.isspace() or (before.isdigit() and name in _OPTIONS):
            found.append((start, match.end(), name))
    return found


def _convert(kind: str, value: str, option: str, where: str) -> Any:
    def fail(expected: str) -> LorafitError:
        return LorafitError(f"{where}: --{option} needs {expected}, got {value!r}")

    if kind == "text":
        return value
    if kind == "sampler":
        return canonical_sampler(value, key=f"{where}: --{option}")
    if kind == "float":
        try:
            number = float(value)
        except ValueError:
            raise fail("a number (e.g. 7.5)") from None
        if number < 0:
            raise fail("a number >= 0")
        return number
    if not re.fullmatch(r"\d+", value):
        raise fail("a whole number")
    number = int(value)
    if kind == "size" and (number < 8 or number % 8):
        raise fail("a positive multiple of 8 pixels (the VAE works on 8x8 blocks)")
    if kind == "steps" and not 1 <= number <= 1000:
        raise fail("between 1 and 1000 steps")
    return number


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt:
    """Parse one kohya-syntax line; ``where`` (e.g. ``prompts.txt line 3``) prefixes errors."""
    markers = _markers(line)
    prompt = _unquote(line[: markers[0][0]] if markers else line)
    if not prompt:
        raise LorafitError(f"{where}: the prompt text is empty (options must follow a prompt)")
    fields: dict[str, Any] = {}
    for index, (_start, end, name) in enumerate(markers):
        stop = markers[index + 1][0] if index + 1 < len(markers) else len(line)
        value = _unquote(line[end:stop])
        if name in _UNSUPPORTED:
            raise LorafitError(f"{where}: --{name} ({_UNSUPPORTED[name]}) is not supported by lorafit's sampler")
        if name not in _OPTIONS:
            known = " ".join(f"--{o}" for o in _OPTIONS)
            raise LorafitError(f"{where}: unknown option --{name}; the options are {known}")
        if not value and name != "n":
            raise LorafitError(f"{where}: --{name} has no value")
        field_name, kind = _OPTIONS[name]
        fields[field_name] = _convert(kind, value, name, where)
    return SamplePrompt(prompt=prompt, **fields)


# kohya's .toml/.json keys (and lorafit's field names) -> SamplePrompt fields.
_DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "sample_steps": "steps",
    "steps": "steps",
    "scale": "cfg",
    "cfg_scale": "cfg",
    "cfg": "cfg",
    "seed": "seed",
    "guidance_scale": "guidance",
    "guidance": "guidance",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}
_DICT_KINDS = {
    "width": "size",
    "height": "size",
    "steps": "steps",
    "cfg": "float",
    "guidance": "float",
    "seed": "seed",
    "sampler": "sampler",
    "negative_prompt": "text",
    "prompt": "text",
}


def prompt_from_dict(entry: dict, where: str) -> SamplePrompt:
    """A prompt given as a mapping (kohya .toml/.json keys, or lorafit's field names)."""
    fields: dict[str, Any] = {}
    for key, value in entry.items():
        if key in ("enum", "subset"):  # kohya bookkeeping keys
            continue
        if key not in _DICT_KEYS:
            raise LorafitError(f"{where}: unknown key {key!r}; use {', '.join(sorted(_DICT_KEYS))}")
        name = _DICT_KEYS[key]
        fields[name] = _convert(_DICT_KINDS[name], str(value).strip(), key, where)
    if not fields.get("prompt"):
        raise LorafitError(f"{where}: no prompt text")
    return SamplePrompt(**fields)


def parse_prompt_text(text: str, source: str) -> list[SamplePrompt]:
    """Every prompt of a kohya ``.txt`` prompt file's content (blank and ``#`` lines skipped)."""
    prompts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            prompts.append(parse_prompt_line(line, f"{source} line {number}"))
    return prompts


def _toml_entries(path: Path) -> list[dict]:
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise LorafitError(f"{path}: not valid TOML ({error})") from None
    # kohya: [prompt] holds defaults, [[prompt.subset]] one entry per image.
    section = data.get("prompt")
    if not isinstance(section, dict) or not isinstance(section.get("subset"), list):
        raise LorafitError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries (kohya's layout)")
    defaults = {k: v for k, v in section.items() if k != "subset"}
    return [{**defaults, **subset} for subset in section["subset"]]


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Read a kohya prompt file: ``.txt`` (one inline-syntax line each), ``.toml`` or ``.json``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LorafitError(f"prompt file {path} does not exist")
    if path.suffix.lower() == ".toml":
        entries = _toml_entries(path)
    elif path.suffix.lower() == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise LorafitError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(entries, list):
            raise LorafitError(f"{path}: expected a JSON list of prompts (strings or objects)")
    else:
        return parse_prompt_text(path.read_text(encoding="utf-8"), str(path))
    prompts = []
    for index, entry in enumerate(entries, start=1):
        where = f"{path} entry {index}"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, where))
        elif isinstance(entry, dict):
            prompts.append(prompt_from_dict(entry, where))
        else:
            raise LorafitError(f"{where}: expected a string or an object, got {type(entry).__name__}")
    return prompts


def collect_prompts(
    prompts: list[str | dict] | None, prompt_file: str | None, key: str = "prompts"
) -> list[SamplePrompt]:
    """Prompts from a config list (inline-syntax strings or mappings) followed by a prompt file's."""
    result = []
    for index, entry in enumerate(prompts or []):
        where = f"{key}[{index}]"
        result.append(
            parse_prompt_line(entry, where) if isinstance(entry, str) else prompt_from_dict(dict(entry), where)
        )
    if prompt_file:
        result.extend(read_prompt_file(prompt_file))
    return result
