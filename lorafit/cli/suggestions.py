"""Parser errors a user can act on: the closest real key for a mistyped one, flags named as typed.

argparse (and jsonargparse over it) says "unrecognized arguments: --model.rnak 16" and stops; kohya
users mistype keys all the time, and with some 200 keys under fit the right one is hard to find
in ``--help``. Here each unknown flag gets the closest known option (difflib over the parser's own
option strings, so it holds for fit/validate and every tool verb alike). jsonargparse names
missing required options by their key ("required: dir, model"); they are shown as typed
(``--model``), positionals by name.

LightningCLI's own ``--optimizer``/``--lr_scheduler`` are not offered by lorafit (its optimizers
are configured under ``model``); whoever types them is told where instead.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (?P<args>.*)$", re.S)
_REQUIRED = re.compile(r"^(?P<head>.*the following arguments are required: )(?P<names>[\w., -]+?)(?P<tail>\.?)$", re.S)
# LightningCLI's optimizer/scheduler options (``--optimizer SGD --optimizer.lr 0.1``), which lorafit leaves out.
LIGHTNING_OPTIMIZER_FLAGS = ("--optimizer", "--lr_scheduler")


def parser_options(parser, subcommand: str | None = None) -> list[str]:
    """Every ``--option`` string of ``parser`` (of its ``subcommand`` parser, when it has subcommands)."""
    action = getattr(parser, "_subcommands_action", None)
    if subcommand and action is not None and subcommand in action.choices:
        parser = action.choices[subcommand]
    return [option for a in parser._actions for option in a.option_strings if option.startswith("--")]


def _positionals(parser, subcommand: str | None) -> set[str]:
    action = getattr(parser, "_subcommands_action", None)
    if subcommand and action is not None and subcommand in action.choices:
        parser = action.choices[subcommand]
    return {a.dest for a in parser._actions if not a.option_strings}


def _split(option: str) -> tuple[str, str]:
    section, _, leaf = option.lstrip("-").rpartition(".")
    return section, leaf


def closest_option(flag: str, options: Iterable[str]) -> str | None:
    """The known option nearest to ``flag``, or None if none is close.

    Keys are compared by their last part, first within the flag's own section (``--model.rnak`` ->
    ``--model.rank``), then anywhere when exactly one key there is nearly the same (``--max_epochs``
    -> ``--trainer.max_epochs``, ``--trainer.rank`` -> ``--model.rank``). Comparing whole flags would
    let a long shared prefix (``--trainer.``) outweigh a leaf that has nothing in common.
    """
    section, leaf = _split(flag.split("=", 1)[0].rstrip("+"))
    options = [o for o in options if not o.endswith((".help", "+"))]
    sections = {o.rsplit(".", 1)[0] for o in options if "." in o}
    keys = [o for o in options if o not in sections]  # a section (--trainer) is no answer to a key
    same_section = {_split(o)[1]: o for o in keys if _split(o)[0] == section}
    found = difflib.get_close_matches(leaf, list(same_section), n=1, cutoff=0.7)
    if found:
        return same_section[found[0]]
    # One level down: the model's settings sit in groups (--model.rnak -> --model.network.rank).
    below = {_split(o)[1]: o for o in keys if _split(o)[0].startswith(f"{section}.")} if section else {}
    found = difflib.get_close_matches(leaf, list(below), n=1, cutoff=0.7)
    if found:
        return below[found[0]]
    anywhere: dict[str, list[str]] = {}
    for option in keys:
        anywhere.setdefault(_split(option)[1], []).append(option)
    found = difflib.get_close_matches(leaf, list(anywhere), n=1, cutoff=0.85)
    return anywhere[found[0]][0] if found and len(anywhere[found[0]]) == 1 else None


def _flags(args_text: str) -> list[str]:
    return [token.split("=", 1)[0] for token in args_text.split() if token.startswith("--")]


def _optimizer_hint(options: list[str]) -> str:
    keys = [o for o in options if re.fullmatch(r"--model\.(\w+\.)?(optimizer|learning_rate|lr_scheduler)", o)]
    return f"lorafit sets the optimizer under model: {', '.join(keys) if keys else '--model.*'}"


def explain(message: str, options: list[str], positionals: Iterable[str] = (), subcommand: str | None = None) -> str:
    """``message`` with what the user can do about it added: a suggestion or the flag as typed."""
    message = " ".join(message.split())
    unrecognized = _UNRECOGNIZED.match(message)
    if unrecognized:
        notes = []
        for flag in _flags(unrecognized.group("args")):
            root = flag.split(".", 1)[0].rstrip("+")
            if root in LIGHTNING_OPTIMIZER_FLAGS and not any(o.startswith(root) for o in options):
                hint = f"{root}: {_optimizer_hint(options)}"
                if hint not in notes:
                    notes.append(hint)
                continue
            suggestion = closest_option(flag, options)
            if suggestion:
                notes.append(f"{flag}: did you mean {suggestion}?")
        return f"{message} ({'; '.join(notes)})" if notes else message
    required = _REQUIRED.match(message)
    if required:
        positional = set(positionals)
        names = [n.strip() for n in required.group("names").split(",") if n.strip()]
        if subcommand:  # jsonargparse names a subcommand's keys with it in front: fit.model.model
            names = [n.removeprefix(f"{subcommand}.") for n in names]
        shown = [n if n in positional or f"--{n}" not in options else f"--{n}" for n in names]
        return f"{required.group('head')}{', '.join(shown)}{required.group('tail')}"
    return message


def explain_for_parser(message: str, parser, subcommand: str | None = None) -> str:
    """:func:`explain` with the options and positionals of ``parser`` (or its ``subcommand`` parser)."""
    return explain(message, parser_options(parser, subcommand), _positionals(parser, subcommand), subcommand)
