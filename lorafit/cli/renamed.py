"""Old spellings of flags and config keys: rewritten to the new ones before parsing, with a one-line notice.

A verb declares its renames (``old flag -> new flag``) as a ``renamed_flags`` attribute of its
function (the tools: ``--steps`` became ``--render.steps`` when the rendering options were grouped);
``fit``/``validate`` get theirs from the callbacks (``samples.steps`` -> ``samples.render.steps``),
in config files as well as on the command line, so the ``config.yaml`` of an older run still
resumes. Nothing the user gave is dropped: a value is moved to its new key, never discarded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.cli")


def _notice(old: list[str], new: list[str], where: str = "") -> None:
    pairs = ", ".join(f"{o} -> {n}" for o, n in zip(old, new))
    log.warning("%srenamed option%s %s; the old spelling still works", where, "s" * (len(old) > 1), pairs)


def rename_flags(argv: list[str], renamed: dict[str, str]) -> list[str]:
    """``argv`` with every old flag (``--old``, ``--old=v``, ``--old+``) spelled the new way."""
    result, old, new = [], [], []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        plus = "+" if flag.endswith("+") else ""
        if flag.removesuffix("+") in renamed:
            target = renamed[flag.removesuffix("+")]
            if flag.removesuffix("+") not in old:
                old.append(flag.removesuffix("+"))
                new.append(target)
            arg = target + plus + equals + value
        result.append(arg)
    if old:
        _notice(old, new)
    return result


def _pop_nested(config: dict, dotted: str):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def _set_nested(config: dict, dotted: str, value, where: str) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise LorafitError(f"{where}: {'.'.join(parents)} must be a mapping to hold {last}")
    if last in node:
        raise LorafitError(f"{where}: both {dotted} and its old spelling are set; keep one")
    node[last] = value


def rename_config_keys(text: str, renamed: dict[str, str], where: str) -> str | None:
    """The YAML ``text`` with old dotted keys moved to their new place, or None when it has none."""
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        return None
    old, new = [], []
    for old_key, new_key in renamed.items():
        found, value = _pop_nested(config, old_key)
        if found:
            _set_nested(config, new_key, value, where)
            old.append(old_key)
            new.append(new_key)
    if not old:
        return None
    _notice(old, new, f"{where}: ")
    return yaml.safe_dump(config, sort_keys=False)


def rename_fit_args(argv: list[str], renamed: dict[str, str]) -> list[str]:
    """``fit``/``validate`` arguments with old keys renamed in flags and in ``--config`` files.

    A config file with old keys is passed on as its rewritten YAML text (jsonargparse's ``--config``
    takes a path or the YAML itself); the file on disk is left as it is.
    """
    argv = rename_flags(argv, {f"--{old}": f"--{new}" for old, new in renamed.items()})
    result = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, equals, value = arg.partition("=")
        if flag in ("--config", "-c") and (equals or index + 1 < len(argv)):
            if not equals:
                index += 1
                value = argv[index]
            path = Path(value)
            text = rename_config_keys(path.read_text(encoding="utf-8"), renamed, value) if path.is_file() else None
            result += [flag, text if text is not None else value]
        else:
            result.append(arg)
        index += 1
    return result
