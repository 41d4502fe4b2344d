"""Command-line spellings users type, rewritten before jsonargparse reads them.

Repeatable list flags for the tool verbs: ``--lora a:0.8 --lora b --render.seed 1 --render.seed 2``.

jsonargparse reads a list argument from one value (``--seed [1,2]``) or appends with ``--seed+ 3``
(onto the default, so ``--seed+ 3`` with default ``[0]`` gives ``[0, 3]``); given twice, a plain
flag keeps only the last value. Shell users expect each repetition to add an item, so before
parsing, every occurrence of a list-typed flag is gathered into one JSON list. A value written
as a list (``--seed '[1, 2]'``) is spliced in, so both spellings work and can be mixed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import yaml


def _element_type(annotation: Any) -> Any:
    """The item type if ``annotation`` is (an Optional/Union with) a list, else None."""
    if typing.get_origin(annotation) is list:
        args = typing.get_args(annotation)
        return args[0] if args else str
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Optional[...] and X | None
        for arg in typing.get_args(annotation):
            found = _element_type(arg)
            if found is not None:
                return found
    return None


def _options(function: Callable) -> Iterator[tuple[str, Any]]:
    """``(option name, type)`` of every parameter; a dataclass parameter (a group such as ``render``)
    gives its fields as ``render.steps``, which is how jsonargparse names them."""
    hints = typing.get_type_hints(function)
    for name in inspect.signature(function).parameters:
        annotation = hints.get(name)
        if dataclasses.is_dataclass(annotation):
            field_hints = typing.get_type_hints(annotation)
            for field in dataclasses.fields(annotation):
                yield f"{name}.{field.name}", field_hints.get(field.name)
        else:
            yield name, annotation


def list_flags(function: Callable) -> dict[str, Any]:
    """``{"--name": item type}`` for every list-typed option of ``function`` (group fields included)."""
    flags = {}
    for name, annotation in _options(function):
        element = _element_type(annotation)
        if element is not None:
            flags[f"--{name}"] = element
    return flags


def _items(value: str, element: Any) -> list:
    if value.lstrip().startswith("["):
        loaded = yaml.safe_load(value)
        return loaded if isinstance(loaded, list) else [loaded]
    # Strings stay verbatim (a prompt may contain ": " or "#"); numbers are read as YAML would.
    return [value if element is str else yaml.safe_load(value)]


def gather_repeated_flags(function: Callable, argv: list[str]) -> list[str]:
    """Rewrite ``argv`` so each list flag of ``function`` appears once, as a JSON list of all its values."""
    flags = list_flags(function)
    gathered: dict[str, list] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, has_value, value = arg.partition("=")
        if flag in flags and (has_value or index + 1 < len(argv)):
            if not has_value:
                index += 1
                value = argv[index]
            gathered.setdefault(flag, []).extend(_items(value, flags[flag]))
        else:
            rest.append(arg)
        index += 1
    for flag, values in gathered.items():
        rest += [flag, json.dumps(values)]
    return rest


# Verbs whose first argument takes several values as bare words (`lorafit prepare a b --out x`).
VARIADIC_FIRST = {"prepare", "merge"}


def gather_leading_positionals(argv: list[str]) -> list[str]:
    """Turn leading bare words into one JSON list, which jsonargparse reads for a list argument.

    jsonargparse gives a list-typed positional exactly one token; a shell user types several.
    """
    count = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    if count < 2:
        return argv
    return [json.dumps(argv[:count]), *argv[count:]]


def underscore_flags(function, argv: list[str]) -> list[str]:
    """Accept ``--caption-ext`` for ``--caption_ext``: options are parameter names (kohya spells them
    with underscores too), but many users and issue texts type dashes; only real parameter names
    are rewritten, so a dashed value is never touched. Old spellings (``renamed_flags``) count too."""
    names = {name for name, _ in _options(function)}
    names |= {flag.removeprefix("--") for flag in getattr(function, "renamed_flags", {})}
    rewritten = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if flag.startswith("--") and "-" in flag[2:] and flag[2:].rstrip("+").replace("-", "_") in names:
            arg = "--" + flag[2:].replace("-", "_") + equals + value
        rewritten.append(arg)
    return rewritten


def bare_bool_flags(function, argv: list[str]) -> list[str]:
    """Read a bool option given without a value (``--json``, ``--verbose``) as ``true``, as every shell
    tool does; jsonargparse wants ``--json true`` and stops with "expected one argument" otherwise."""
    bools = {f"--{name}" for name, annotation in _options(function) if annotation in (bool, bool | None)}
    rewritten = []
    for index, arg in enumerate(argv):
        rewritten.append(arg)
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg in bools and (following is None or following.startswith("--")):
            rewritten.append("true")
    return rewritten
