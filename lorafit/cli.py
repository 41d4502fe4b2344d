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
    "tiny-clip": ("lorafit.models.tiny_clip:save_tiny_clip", "Write a tiny random-weight CLIP model (for trying grid/probe)."),
    "demo-data": ("lorafit.data.demo_dataset:write_demo_dataset", "Write the generated demo dataset."),
    "toy-data": ("lorafit.toyworld.concept_data:write_concept_dataset",
                 "Write the toy world's LoRA dataset: pictures of the held-out star, trigger word ohwx."),
    "prepare": ("lorafit.data.prepare:prepare", "Check kohya-style image folders and write webdataset shards + report."),
    "caption": ("lorafit.captioning.caption:caption", "Caption every image of a folder with BLIP-style models or a WD14 tagger."),
    "review": ("lorafit.review.server:review", "Local page to review and fix captions: tags, search, bulk edits."),
    "cache": ("lorafit.data.cache:cache", "Encode prepared shards into VAE latent (and text embedding) shards."),
    "submit": ("lorafit.slurm.submit:main", "Render a SLURM sbatch script for `lorafit fit` and submit it (or print it)."),
    "generate": ("lorafit.inference.generate:generate", "Generate images with LoRAs at chosen strengths (hires fix)."),
    "grid": ("lorafit.inference.grid:grid", "Epoch x strength x prompt grids, selection metrics, HTML report."),
    "probe": ("lorafit.inference.probe:probe", "Does the base model already know the concept? Images, scores, verdict."),
}
# Verbs whose list options may be repeated (`--lora a --lora b`); see lorafit/cli_lists.py.
REPEATABLE_LISTS = {"generate", "grid", "probe", "caption"}
LIGHTNING_VERBS = ("fit", "validate")

# ModelCheckpoint settings that rewrite checkpoints/last.ckpt after every epoch, and only that file.
# Not `save_last=True, save_top_k=0`: since Lightning 2.6 that writes last.ckpt only when a top-k
# checkpoint is saved at the same step, i.e. never before the end of training, so a killed run had
# nothing to resume from. Instead the single "top-k" file is named last.ckpt and overwritten in place
# (atomically, see atomic_io.py); `--ckpt_path last` finds it.
LAST_CHECKPOINT = {"filename": "last", "save_top_k": 1, "save_last": False, "enable_version_counter": False,
                   "every_n_epochs": 1}


def _build_cli_class():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lorafit.atomic_io import atomic_write_text
    from lorafit.callbacks.export import LoraExport
    from lorafit.callbacks.metrics import TrainingMetrics
    from lorafit.callbacks.requeue import RequeueOnSignal
    from lorafit.callbacks.samples import SampleImages
    from lorafit.checkpoint_io import AtomicCheckpointIO
    from lorafit.data.datamodule import LoraDataModule
    from lorafit.loggers.wandb import WandbRunLogger
    from lorafit.module import LoraDiffusionModule
    from lorafit.resume_settings import refuse_changed_network_in_file

    class RunDirConfig(SaveConfigCallback):
        """Save the resolved config as ``<default_root_dir>/config.yaml``, beside the LoRA files.

        Overwriting is intended: a resumed or requeued run rewrites the same run's config (through a
        temporary file, so a kill mid-write leaves the previous one). W&B also gets the whole config
        (Lightning itself logs only the model's and data module's arguments).
        """

        def save_config(self, trainer, pl_module, stage) -> None:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write_text(Path(trainer.default_root_dir) / self.config_filename, text)
            wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
            if wandb_loggers:
                config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
                for logger in wandb_loggers:
                    logger.log_hyperparams({"config": config})

    class LorafitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(LoraExport, "export")
            parser.add_lightning_class_args(SampleImages, "samples")
            parser.add_lightning_class_args(TrainingMetrics, "metrics")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            # Checkpoints hold only LoRA weights + optimizer state (small); keep last.ckpt for resume
            # under the run directory, whatever logger is configured.
            parser.set_defaults({f"checkpoint.{key}": value for key, value in LAST_CHECKPOINT.items()})
            parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath",
                                  compute_fn=lambda root: os.path.join(root or ".", "checkpoints"))
            # After "checkpoint": Lightning keeps checkpoint callbacks in order at the end of the list.
            parser.add_lightning_class_args(RequeueOnSignal, "requeue")

        def _parse_ckpt_path(self) -> None:
            """Keeps the config's model.* settings when resuming (Lightning's version replaces them).

            When --ckpt_path names a file (not `last`), LightningCLI overwrites the model's config
            with the hyperparameters saved in the checkpoint, silently: a resumed run kept the old
            learning rate, and a changed network_type or rank was ignored. In lorafit every
            ckpt_path resumes with the config as written; the module then refuses, with one line,
            settings that do not fit the checkpoint's network (lorafit/resume_settings.py).
            """

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            # Atomic checkpoint files unless the config chose its own CheckpointIO plugin.
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

        def _check_resume_settings(self) -> None:
            # Before the trainer's setup rewrites the run's config.yaml; the module checks again on load.
            config = self.config[self.subcommand]
            ckpt_path, callback = config.get("ckpt_path"), self.trainer.checkpoint_callback
            if ckpt_path == "last":  # lorafit's layout (LAST_CHECKPOINT); another one is checked on load only
                named_last = config.get("checkpoint.filename") == "last" and callback is not None and callback.dirpath
                ckpt_path = os.path.join(callback.dirpath, "last.ckpt") if named_last else None
            if ckpt_path and os.path.isfile(ckpt_path):
                refuse_changed_network_in_file(ckpt_path, self.model.hparams)

        def before_fit(self) -> None:
            self._check_resume_settings()
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbRunLogger):
                    logger.bind_run_dir(self.trainer.default_root_dir)

        def before_validate(self) -> None:
            self._check_resume_settings()

    return LorafitCLI, LoraDiffusionModule, LoraDataModule, RunDirConfig


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


def _underscore_flags(function, argv: list[str]) -> list[str]:
    """Accept ``--caption-ext`` for ``--caption_ext``: options are parameter names (kohya spells them
    with underscores too), but many users and issue texts type dashes; only real parameter names
    are rewritten, so a dashed value is never touched."""
    import inspect

    names = set(inspect.signature(function).parameters)
    rewritten = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if flag.startswith("--") and "-" in flag[2:] and flag[2:].rstrip("+").replace("-", "_") in names:
            arg = "--" + flag[2:].replace("-", "_") + equals + value
        rewritten.append(arg)
    return rewritten


def run_tool(verb: str, argv: list[str]):
    from jsonargparse import auto_cli

    if verb in VARIADIC_FIRST:
        argv = _gather_leading_positionals(argv)

    target, _ = TOOL_VERBS[verb]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    if getattr(function, "parses_own_args", False):  # e.g. submit, whose flags follow sbatch's spelling
        return function(argv)
    argv = _underscore_flags(function, argv)
    if verb in REPEATABLE_LISTS:
        from lorafit.cli_lists import gather_repeated_flags

        argv = gather_repeated_flags(function, argv)
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
    # Loading adapters into a module that already has one (several LoRAs at once) is intended.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    # Per-component "Loading pipeline components" bars would bury the one line per image a tool prints.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    except Exception as error:
        # jsonargparse wraps errors raised while instantiating a union-typed option (trainer.logger)
        # in its own ValueError; the LorafitError inside is still the one line to show.
        cause = _lorafit_cause(error)
        if cause is None:
            raise
        print(f"lorafit: error: {cause}", file=sys.stderr)
        raise SystemExit(2)


def _lorafit_cause(error: BaseException) -> Optional[LorafitError]:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LorafitError):
            return error
        seen.add(id(error))
        error = error.__cause__  # `raise ... from` only: an error *during* handling is a real one
    return None


if __name__ == "__main__":
    main()
