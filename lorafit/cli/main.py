"""The ``lorafit`` command: Lightning verbs (fit, validate) and lorafit's own tools.

``fit``/``validate`` go through LightningCLI (:mod:`lorafit.cli.lightning_cli`). Every other verb
is a plain typed function turned into a command by jsonargparse, with ``--help`` from its docstring.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from argparse import ArgumentError

from lorafit.cli.lightning_cli import VERBS as LIGHTNING_VERBS  # light: Lightning is imported when a verb runs
from lorafit.cli.startup import block_optional_imports, quiet_known_notices
from lorafit.errors import LorafitError

# verb -> "module:function"; imported only when the verb runs, so `lorafit --help` stays fast.
TOOL_VERBS = {
    "convert": ("lorafit.networks.convert:convert", "Convert a LoRA file between kohya and diffusers format."),
    "inspect": (
        "lorafit.networks.toolbox.inspect_file:inspect",
        "Show a LoRA file: family, format, type, ranks/alphas per block, training metadata, tags, hash.",
    ),
    "resize": ("lorafit.networks.toolbox.resize:resize", "Cut a LoRA to a lower rank by SVD (fixed or dynamic)."),
    "merge": (
        "lorafit.networks.toolbox.merge:merge",
        "Merge LoRAs into one LoRA, or into the base model (diffusers dir or single file).",
    ),
    "extract": ("lorafit.networks.toolbox.extract:extract", "Extract a LoRA/LoCon from the difference of two models."),
    "tiny": (
        "lorafit.families.tiny:save_tiny_pipeline",
        "Write a tiny random-weight pipeline of a model family (sd1, flux, z-image, ...).",
    ),
    "tiny-clip": (
        "lorafit.inference.tiny_clip:save_tiny_clip",
        "Write a tiny random-weight CLIP model (for trying grid/probe).",
    ),
    "demo-data": ("lorafit.data.demo_dataset:write_demo_dataset", "Write the generated demo dataset."),
    "toy-data": (
        "lorafit.toyworld.concept_data:write_concept_dataset",
        "Write the toy world's LoRA dataset: pictures of the held-out star, trigger word ohwx.",
    ),
    "prepare": (
        "lorafit.data.prepare:prepare",
        "Check kohya-style image folders and write webdataset shards + report.",
    ),
    "caption": (
        "lorafit.captioning.caption:caption",
        "Caption every image of a folder with BLIP-style models or a WD14 tagger.",
    ),
    "review": ("lorafit.review.server:review", "Local page to review and fix captions: tags, search, bulk edits."),
    "cache": ("lorafit.data.cache:cache", "Encode prepared shards into VAE latent (and text embedding) shards."),
    "submit": (
        "lorafit.slurm.submit:main",
        "Render a SLURM sbatch script for `lorafit fit` and submit it (or print it).",
    ),
    "generate": ("lorafit.inference.generate:generate", "Generate images with LoRAs at chosen strengths (hires fix)."),
    "grid": ("lorafit.inference.grid:grid", "Epoch x strength x prompt grids, selection metrics, HTML report."),
    "probe": (
        "lorafit.inference.probe:probe",
        "Does the base model already know the concept? Images, scores, verdict.",
    ),
}
# Verbs whose list options may be repeated (`--lora a --lora b`); see lorafit/cli/arguments.py.
REPEATABLE_LISTS = {"generate", "grid", "probe", "caption"}


def _tool_function(verb: str):
    module_name, function_name = TOOL_VERBS[verb][0].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_tool(verb: str, argv: list[str]):
    from jsonargparse import auto_cli

    from lorafit.cli.arguments import (
        VARIADIC_FIRST,
        bare_bool_flags,
        gather_leading_positionals,
        gather_repeated_flags,
        underscore_flags,
    )
    from lorafit.cli.renamed import rename_flags

    if verb in VARIADIC_FIRST:
        argv = gather_leading_positionals(argv)

    function = _tool_function(verb)
    if getattr(function, "parses_own_args", False):  # e.g. submit, whose flags follow sbatch's spelling
        return function(argv)
    argv = bare_bool_flags(function, underscore_flags(function, argv))
    argv = rename_flags(argv, getattr(function, "renamed_flags", {}))
    if verb in REPEATABLE_LISTS:
        argv = gather_repeated_flags(function, argv)
    return auto_cli(
        function, args=argv, as_positional=True, parser_mode="yaml", prog=f"lorafit {verb}", exit_on_error=False
    )


def _usage() -> str:
    lines = ["usage: lorafit VERB [options]   (lorafit VERB --help for each)", "", "verbs:"]
    lines += [f"  {v:<10} Lightning {v} (LoRA training), configured by --config YAML" for v in LIGHTNING_VERBS]
    lines += [f"  {v:<10} {help_}" for v, (_, help_) in TOOL_VERBS.items()]
    return "\n".join(lines)


def _run_verb(verb: str, argv: list[str]):
    if verb in LIGHTNING_VERBS:
        from lorafit.cli.lightning_cli import run_lightning

        return run_lightning(argv)
    if verb in TOOL_VERBS:
        return run_tool(verb, argv[1:])
    raise LorafitError(f"unknown verb {verb!r}; run `lorafit --help` for the list")


def _explained(verb: str, argv: list[str], error: ArgumentError) -> str:
    """The parser's message with the closest key for a mistyped one (lorafit/cli/suggestions.py).

    The parser is built again the way the verb built it (jsonargparse's ``capture_parser`` stops
    before parsing), so the suggestions come from exactly the options the verb accepts.
    """
    from jsonargparse import capture_parser

    from lorafit.cli.suggestions import explain_for_parser

    message = str(error)
    if verb in TOOL_VERBS and getattr(_tool_function(verb), "parses_own_args", False):  # argparse of its own
        return " ".join(message.split())
    try:
        parser = capture_parser(lambda: _run_verb(verb, argv))
    except Exception as failure:  # noqa: BLE001 - no suggestion is better than a second error
        logging.getLogger("lorafit.cli").debug("no parser to suggest from: %s", failure)
        return " ".join(message.split())
    return explain_for_parser(message, parser, verb if verb in LIGHTNING_VERBS else None)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    block_optional_imports()
    quiet_known_notices()
    # transformers draws a "Loading weights" bar per model inside diffusers' "Loading pipeline
    # components" bar; it follows the hub's switch (read when transformers is imported).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # force=True: bind to the current stderr on every call (tests swap it; in-process reuse too).
    logging.basicConfig(
        level=os.environ.get("LORAFIT_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning prints its own lines; don't print them twice
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb = argv[0]
    try:
        _run_verb(verb, argv)
    except LorafitError as error:
        print(f"lorafit: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as error:
        print(f"lorafit: error: {_explained(verb, argv, error)} (see `lorafit {verb} --help`)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as error:
        # jsonargparse wraps errors raised while instantiating a union-typed option (trainer.logger)
        # in its own ValueError; the LorafitError inside is still the one line to show.
        cause = _lorafit_cause(error)
        if cause is None:
            raise
        print(f"lorafit: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _lorafit_cause(error: BaseException) -> LorafitError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LorafitError):
            return error
        seen.add(id(error))
        error = error.__cause__  # `raise ... from` only: an error *during* handling is a real one
    return None


if __name__ == "__main__":
    main()
