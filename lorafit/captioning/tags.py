"""Comma-separated tag captions: splitting, joining, cleaning and counting (pure string functions).

Booru taggers and most LoRA guides write captions as ``"ohwx dog, outdoors, grass"``: a list of
tags separated by commas. Sentence captions (BLIP) are the one-tag case of the same format, so
the same helpers serve both. Only the caption line counts (the first non-blank line, the one
training reads); other lines of a caption file are the user's and are kept. The review page's
JavaScript applies the same rules (caption line, split on commas, trim, compare case-insensitively)
so a tag removed there is the tag removed here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

SEPARATOR = ", "

# Danbooru writes words of a tag with underscores ("long_hair"); prompts use spaces. Emoticon
# tags ("^_^", "o_o", "(o)_(o)", "||_||") are the exception: there the underscore is the mouth,
# and replacing it changes the tag's meaning. They are recognised by shape rather than by a list:
# two short halves of symbols/digits/single eye letters, never a real word on either side.
_EMOTICON_HALF = re.compile(r"^[^A-Za-z]{1,3}$|^[^A-Za-z]?[A-Za-z][^A-Za-z]?$")


def is_emoticon_tag(tag: str) -> bool:
    """True for kaomoji tags such as ``^_^``, ``o_o``, ``>_<``, ``(o)_(o)``, ``0_0``, ``||_||``.

    Args:
        tag: A tag as the tagger's CSV spells it (with underscores).
    """
    halves = tag.split("_")
    return len(halves) == 2 and all(_EMOTICON_HALF.match(half) for half in halves)


def tag_to_prompt(tag: str) -> str:
    """A tagger's tag name as prompt text: underscores become spaces, except in emoticon tags.

    Args:
        tag: A tag as the tagger's CSV spells it, e.g. ``long_hair``.
    """
    return tag if is_emoticon_tag(tag) else tag.replace("_", " ")


def split_tags(caption: str) -> list[str]:
    """The comma-separated pieces of a caption, trimmed, empty pieces dropped, order kept.

    Args:
        caption: Caption text; only its first line counts (as for training, see kohya_folders).
    """
    first_line = next((line for line in caption.splitlines() if line.strip()), "")
    return [piece.strip() for piece in first_line.split(",") if piece.strip()]


def join_tags(tags: Iterable[str]) -> str:
    """Tags joined with ``", "``; duplicates (compared case-insensitively) keep their first place."""
    seen: set[str] = set()
    kept = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            kept.append(tag.strip())
    return SEPARATOR.join(kept)


def tag_key(tag: str) -> str:
    """How two spellings of a tag are compared: trimmed, lower case, underscores as spaces.

    So ``--remove_tags long_hair`` removes the ``long hair`` the tagger wrote.
    """
    tag = tag.strip().lower()
    return tag if is_emoticon_tag(tag) else tag.replace("_", " ")


def parse_tag_list(tags: str | Iterable[str] | None) -> list[str]:
    """A user's tag list option: ``"a, b"`` or ``["a", "b"]`` (both allowed on the command line)."""
    if tags is None:
        return []
    items = [tags] if isinstance(tags, str) else list(tags)
    return [piece for item in items for piece in split_tags(str(item))]


def remove_tags(tags: list[str], unwanted: Iterable[str]) -> list[str]:
    """``tags`` without any tag matching one of ``unwanted`` (see :func:`tag_key`)."""
    drop = {tag_key(tag) for tag in unwanted}
    return [tag for tag in tags if tag_key(tag) not in drop]


def with_prefix(caption: str, prefix: str | None) -> str:
    """The caption with ``prefix`` (a trigger word such as ``"ohwx dog,"``) in front, once.

    The prefix is written as given (kohya's ``--caption_prefix``); a space separates it from the
    caption unless it already ends with one. A caption already starting with it is left alone,
    so appending to or re-captioning a prefixed caption never doubles the trigger word.
    """
    if not prefix:
        return caption
    if caption.startswith((prefix, prefix.rstrip())):
        return caption
    if not caption:
        return prefix.rstrip()
    return prefix + ("" if prefix[-1].isspace() else " ") + caption


def caption_line(text: str) -> tuple[str, str, str]:
    """``text`` cut around its caption line: ``(before, line, after)``, joined back they are ``text``.

    The caption line is the first non-blank line, the one training reads (kohya's rule, see
    kohya_folders.read_caption). ``before`` holds the blank lines above it, ``after`` its line
    ending and every later line, all exactly as they were (``\\r\\n`` endings too). A text with no
    non-blank line gives ``(text, "", "")``.
    """
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.strip():
            body = line.splitlines()[0]  # without its line break, whichever of splitlines' it is
            return "".join(lines[:index]), body, line[len(body) :] + "".join(lines[index + 1 :])
    return text, "", ""


def append_caption(existing: str, new: str, prefix: str | None = None) -> str:
    """``existing`` with the tags of ``new`` it does not hold yet added to its caption line (``--mode append``).

    Only the caption line (see :func:`caption_line`) changes: the tags of ``new`` go after the
    user's, ``prefix`` in front (:func:`with_prefix`). Blank lines above it and every line below it
    (notes, a longer description kept for later) stay as they were, in order; training never reads
    them, but they are the user's. An ``existing`` text without a caption line gives ``new``.

    Args:
        existing: The caption file's text as read.
        new: The new caption (comma-separated tags or a sentence).
        prefix: Trigger word put in front of the caption line, once (kohya's ``--caption_prefix``).
    """
    before, line, after = caption_line(existing)
    if not line:
        return with_prefix(new, prefix)
    return before + with_prefix(join_tags(split_tags(line) + split_tags(new)), prefix) + after


def tag_frequency(captions: Iterable[str]) -> Counter:
    """How many captions hold each tag (counted once per caption, first spelling kept)."""
    counts: Counter = Counter()
    spelling: dict[str, str] = {}
    for caption in captions:
        seen: set[str] = set()
        for tag in split_tags(caption):
            key = tag_key(tag)
            if key not in seen:
                seen.add(key)
                counts[spelling.setdefault(key, tag)] += 1
    return counts


def format_frequency(counts: Counter, total: int, top: int = 30) -> str:
    """A printable table of the ``top`` most frequent tags: count, share of images, tag."""
    if not counts:
        return "no tags written"
    lines = [f"tag frequency over {total} captions ({len(counts)} distinct tags, top {min(top, len(counts))}):"]
    for tag, count in counts.most_common(top):
        share = 100.0 * count / max(total, 1)
        lines.append(f"  {count:5d}  {share:5.1f}%  {tag}")
    return "\n".join(lines)
