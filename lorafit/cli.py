"""The ``lorafit`` command: Lightning verbs (fit, validate) and lorafit's own tools.

``fit``/``validate`` go through :class:`LorafitCLI` (LightningCLI), so every ``__init__`` argument
of the module, data module, trainer and callbacks is a YAML key and a ``--flag``. Every other verb
is a plain typed function turned into a command by jsonargparse, with ``--help`` from its docstring.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

from lorafit.errors import LorafitError

# verb -> "module:function"; imported only when the verb runs, so `lorafit --help` stays fast.
TOOL_VERBS = {
    "convert": ("lorafit.networks.convert:convert", "Convert a LoRA file between kohya and diffusers format."),
    "tiny": ("lorafit.models.tiny:save_tiny_pipeline", "Write a tiny random-weight SD1/SD2/SDXL pipeline."),
    "demo-data": ("lorafit.data.demo_dataset:write_demo_dataset", "Write the generated demo dataset."),
    "toy-data": ("lorafit.toyworld.concept_data:write_concept_dataset",
                 "Write the toy world's LoRA dataset: pictures of the held-out star, trigger word ohwx."),
    "prepare": ("lorafit.data.prepare:prepare", "Check kohya-style image folders and write webdataset shards + report."),
}
LIGHTNING_VERBS = ("fit", "validate")


def _build_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from lorafit.callbacks.export import LoraExport
    from lorafit.data.folder import FolderDataModule
    from lorafit.module import LoraDiffusionModule

    class RunDirConfig(SaveConfigCallback):
        """Save the resolved config as ``<default_root_dir>/config.yaml``, beside the LoRA files.

        Overwriting is intended: a resumed or requeued run rewrites the same run's config.
        """

        def save_config(self, trainer, pl_module, stage) -> None:
            path = Path(trainer.default_root_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)

    class LorafitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(LoraExport, "export")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            # Checkpoints hold only LoRA weights + optimizer state (small); keep last.ckpt for resume
            # under the run directory, whatever logger is configured.
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                                 "checkpoint.every_n_epochs": 1})
            parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                                  compute_fn=lambda root: os.path.join(root or ".", "checkpoints"))

    return LorafitCLI, LoraDiffusionModule, FolderDataModule, RunDirConfig


def run_lightning(argv: list[str]):
    # `--print_config` alone prints the YAML with every option's help as a comment.
    argv = ["--print_config=comments" if a == "--print_config" else a for a in argv]
    cli_class, module_class, data_class, config_callback = _build_cli_class()
    return cli_class(
        module_class,
        data_class,
        save_config_callback=config_callback,
        save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
        trainer_defaults={"default_root_dir": "runs/lorafit", "max_epochs": 10},
        seed_everything_default=0,
        # exit_on_error=False: a bad key raises instead of printing the whole usage; main() prints one line.
        parser_kwargs={"description": "Train LoRA adapters on Stable Diffusion 1.x/2.x/SDXL.", "exit_on_error": False},
        args=argv,
    )


# Verbs whose first argument takes several values as bare words (`lorafit prepare a b --out x`).
VARIADIC_FIRST = {"prepare"}


def _gather_leading_positionals(argv: list[str]) -> list[str]:
    """Turn leading bare words into one JSON list, which jsonargparse reads for a list argument.

    jsonargparse gives a list-typed positional exactly one token; a shell user types several.
    """
    count = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    if count < 2:
        return argv
    return [json.dumps(argv[:count]), *argv[count:]]


def run_tool(verb: str, argv: list[str]):
    from jsonargparse import auto_cli

    if verb in VARIADIC_FIRST:
        argv = _gather_leading_positionals(argv)

    target, _ = TOOL_VERBS[verb]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return auto_cli(function, args=argv, as_positional=True, parser_mode="yaml", prog=f"lorafit {verb}",
                    exit_on_error=False)


def _usage() -> str:
    lines = ["usage: lorafit VERB [options]   (lorafit VERB --help for each)", "", "verbs:"]
    lines += [f"  {v:<10} Lightning {v} (LoRA training), configured by --config YAML" for v in LIGHTNING_VERBS]
    lines += [f"  {v:<10} {help_}" for v, (_, help_) in TOOL_VERBS.items()]
    return "\n".join(lines)


def _quiet_known_warnings() -> None:
    # We pass the (rewritten) command line on purpose; Lightning warns whenever args are given.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # Frozen base modules stay in eval mode by design (no dropout in the frozen parts).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode")
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")  # diffusers -> huggingface_hub
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")  # lightning on torch 2.13
    # Our val_dataloader returns [] when no data.val_dir is set: no validation, nothing to warn about.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    # transformers warns at import that torchvision is absent (only its image processors use it).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    # force=True: bind to the current stderr on every call (tests swap it; in-process reuse too).
    logging.basicConfig(level=os.environ.get("LORAFIT_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # Lightning prints its own lines; don't print them twice
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb = argv[0]
    try:
        if verb in LIGHTNING_VERBS:
            run_lightning(argv)
        elif verb in TOOL_VERBS:
            run_tool(verb, argv[1:])
        else:
            raise LorafitError(f"unknown verb {verb!r}; run `lorafit --help` for the list")
    except LorafitError as error:
        print(f"lorafit: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    except ArgumentError as error:
        message = " ".join(str(error).split())
        print(f"lorafit: error: {message} (see `lorafit {verb} --help`)", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
