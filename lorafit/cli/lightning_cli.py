"""``lorafit fit`` / ``lorafit validate``: LightningCLI with lorafit's callbacks, checkpoint layout and checks.

Every ``__init__`` argument of the module, data module, trainer and callbacks is a YAML key and a
``--flag``. Lightning is imported only when one of these verbs runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.cli.run_folder import RefusedStartCleanup, record_run_folder
from lorafit.cli.trainer_setup import (
    honour_disabled_checkpointing,
    keep_config_out_of_lightning_hparams,
    use_lorafit_progress_bar,
)
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.io.run_lock import RunFolderLock

# LightningCLI's verbs that lorafit offers; Lightning's `test`/`predict` are not among them (no test step).
VERBS = ("fit", "validate")

# ModelCheckpoint settings that rewrite checkpoints/last.ckpt after every epoch, and only that file.
# Not `save_last=True, save_top_k=0`: since Lightning 2.6 that writes last.ckpt only when a top-k
# checkpoint is saved at the same step, i.e. never before the end of training, so a killed run had
# nothing to resume from. Instead the single "top-k" file is named last.ckpt and overwritten in place
# (atomically, see lorafit/io/atomic.py); `--ckpt_path last` finds it.
LAST_CHECKPOINT = {
    "filename": "last",
    "save_top_k": 1,
    "save_last": False,
    "enable_version_counter": False,
    "every_n_epochs": 1,
    # At the end of every training epoch, whatever the validation settings: left to Lightning, the
    # save waits for a validation round, and with trainer.check_val_every_n_epoch > 1 and no
    # validation data none ever comes (no last.ckpt at all).
    "save_on_train_epoch_end": True,
}


# `--ckpt_path` values Lightning resolves itself (no file to check here).
_CKPT_KEYWORDS = ("last", "best", "hpc")


@dataclass
class _Run:
    """What one fit/validate holds while it runs: its folder and, on rank 0, the folder's lock."""

    folder: Path | None = None
    lock: RunFolderLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _refuse_settings_that_do_nothing(config, subcommand: str) -> None:
    """Settings that would load the model and exit having trained or saved nothing, or end in a traceback."""
    trainer, checkpoint = config["trainer"], config["checkpoint"]
    if subcommand == "fit":
        for key in ("max_epochs", "max_steps"):
            if trainer.get(key) == 0:
                raise LorafitError(
                    f"trainer.{key} is 0: the run would load the model and stop without training or writing "
                    f"anything; use 1 or more (-1: no limit, with the other of trainer.max_epochs/max_steps set)"
                )
    steps, epochs = checkpoint.get("every_n_train_steps") or 0, checkpoint.get("every_n_epochs") or 0
    if steps > 0 and epochs > 0:
        raise LorafitError(
            f"checkpoint.every_n_train_steps {steps} and checkpoint.every_n_epochs {epochs} are both set, but "
            f"Lightning's ModelCheckpoint takes one: add --checkpoint.every_n_epochs 0 to save every {steps} steps "
            "(checkpoints/last.ckpt is then rewritten every that many steps)"
        )


def _config_files(config) -> list[str]:
    return [str(getattr(path, "absolute", path)) for path in config.get("config") or []]


def _build_cli_class(run: _Run | None = None, verb: str | None = None):
    """LightningCLI for lorafit, with the parser of ``verb`` alone (of each of :data:`VERBS` otherwise).

    Building one verb's parser is most of LightningCLI's start-up (every option of the trainer,
    module, data module and callbacks, with their docstrings for ``--help``); a run uses one.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from lorafit.callbacks.ema import AdapterEMA
    from lorafit.callbacks.export import LoraExport
    from lorafit.callbacks.metrics import TrainingMetrics
    from lorafit.callbacks.requeue import RequeueOnSignal
    from lorafit.callbacks.samples import SampleImages
    from lorafit.cli.run_config import RunDirConfig
    from lorafit.data.datamodule import LoraDataModule
    from lorafit.loggers.wandb import WandbRunLogger
    from lorafit.training.checkpoint_io import AtomicCheckpointIO
    from lorafit.training.module import LoraDiffusionModule
    from lorafit.training.resume_settings import refuse_changed_network_in_file

    run = run if run is not None else _Run()

    verbs = (verb,) if verb in VERBS else VERBS

    class LorafitCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            """The verbs to build parsers for (LightningCLI's hook), with the ``Trainer`` method arguments they skip."""
            return {name: skip for name, skip in LightningCLI.subcommands().items() if name in verbs}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(LoraExport, "export")
            parser.add_lightning_class_args(AdapterEMA, "ema")
            parser.add_lightning_class_args(SampleImages, "samples")
            parser.add_lightning_class_args(TrainingMetrics, "metrics")
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            # Checkpoints hold only LoRA weights + optimizer state (small); keep last.ckpt for resume
            # under the run directory, whatever logger is configured.
            parser.set_defaults({f"checkpoint.{key}": value for key, value in LAST_CHECKPOINT.items()})
            parser.link_arguments(
                "trainer.default_root_dir",
                "checkpoint.dirpath",
                compute_fn=lambda root: os.path.join(root or ".", "checkpoints"),
            )
            # After "checkpoint": Lightning keeps checkpoint callbacks in order at the end of the list.
            parser.add_lightning_class_args(RequeueOnSignal, "requeue")

        def _parse_ckpt_path(self) -> None:
            """Keeps the config's model.* settings when resuming (Lightning's version replaces them).

            When --ckpt_path names a file (not `last`), LightningCLI overwrites the model's config
            with the hyperparameters saved in the checkpoint, silently: a resumed run kept the old
            learning rate, and a changed network_type or rank was ignored. In lorafit every
            ckpt_path resumes with the config as written; the module then refuses, with one line,
            settings that do not fit the checkpoint's network (lorafit/training/resume_settings.py).
            """

        def before_instantiate_classes(self) -> None:
            """Every check that needs no model runs here, and rank 0 locks the run folder: before the
            model loads and before anything is written there (config.yaml is written at setup)."""
            from lorafit.data.pipe_policy import refuse_untrusted_pipes
            from lorafit.io.checkpoint_file import check_resume_checkpoint
            from lorafit.io.run_lock import RunFolderLock, is_launching_process

            config = self.config[self.subcommand]
            _refuse_settings_that_do_nothing(config, self.subcommand)
            refuse_untrusted_pipes(config["data"], _config_files(config))
            ckpt_path = config.get("ckpt_path")
            if ckpt_path and str(ckpt_path) not in _CKPT_KEYWORDS and not str(ckpt_path).startswith("registry"):
                check_resume_checkpoint(ckpt_path)
            run.folder = Path(config["trainer"].get("default_root_dir") or ".")
            if is_launching_process():
                run.lock = RunFolderLock(run.folder).acquire()

        def instantiate_trainer(self, **kwargs):
            checkpointing = self.config[self.subcommand].get("trainer.enable_checkpointing") is not False
            if not checkpointing:  # built with it on, then lorafit's checkpoint callbacks are taken out
                kwargs["enable_checkpointing"] = True
            trainer = super().instantiate_trainer(**kwargs)
            if not checkpointing:
                honour_disabled_checkpointing(trainer, self.config[self.subcommand].get("ckpt_path"))
            use_lorafit_progress_bar(trainer, self.config[self.subcommand].get("trainer.callbacks"))
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

        refused_start = RefusedStartCleanup()  # replaced per run by run_lightning

        def before_fit(self) -> None:
            record_run_folder(self)
            self._check_resume_settings()
            keep_config_out_of_lightning_hparams(self.model, self.datamodule)
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbRunLogger):
                    logger.bind_run_dir(self.trainer.default_root_dir)

        def before_validate(self) -> None:
            record_run_folder(self)
            self._check_resume_settings()
            keep_config_out_of_lightning_hparams(self.model, self.datamodule)

    return LorafitCLI, LoraDiffusionModule, LoraDataModule, RunDirConfig


def renamed_keys() -> dict[str, str]:
    """Old config keys of fit/validate -> their new place (kept working with a notice, cli/renamed.py):
    the samples' rendering options and the model's flat settings of earlier versions."""
    from lorafit.callbacks.samples import SampleImages
    from lorafit.training.legacy_keys import LEGACY_KEYS

    renamed = {f"samples.{old}": f"samples.{new}" for old, new in SampleImages.renamed_keys.items()}
    renamed.update({f"model.{old}": f"model.{group}.{name}" for old, (group, name) in LEGACY_KEYS.items()})
    return renamed


def optimizer_name_as_group(argv: list[str]) -> list[str]:
    """The one old key whose value changed shape: ``model.optimizer: AdamW`` (a name) is now
    ``model.optimizer.name``, in flags and in ``--config`` files (passed on as rewritten YAML)."""
    from pathlib import Path

    import yaml

    from lorafit.training.legacy_keys import log

    out, index = [], 0
    while index < len(argv):
        arg = argv[index]
        flag, equals, value = arg.partition("=")
        has_value = equals or index + 1 < len(argv)
        if flag in ("--config", "-c") and has_value:
            index += 0 if equals else 1
            value = value if equals else argv[index]
            path = Path(value).expanduser()
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
            if isinstance(loaded, dict) and isinstance((loaded.get("model") or {}).get("optimizer"), str):
                log.warning("%s: model.optimizer NAME is now model.optimizer.name; the old key still works", value)
                loaded["model"]["optimizer"] = {"name": loaded["model"]["optimizer"]}
                value = yaml.safe_dump(loaded, sort_keys=False)
            out += [flag, value]
        elif flag == "--model.optimizer" and has_value:
            index += 0 if equals else 1
            value = value if equals else argv[index]
            if value.lstrip().startswith(("{", "[")) or value.startswith("-"):
                out += [flag, value]
            else:
                log.warning("--model.optimizer NAME is now --model.optimizer.name NAME; the old flag still works")
                out += ["--model.optimizer.name", value]
        else:
            out.append(arg)
        index += 1
    return out


def _worker_error(error: LorafitError) -> LorafitError:
    """A LorafitError raised in a DataLoader worker arrives with the worker's traceback in its message
    (torch's ExceptionWrapper); its own one line is the traceback's last."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return error
    last = text.rstrip().splitlines()[-1]
    return LorafitError(last.split("LorafitError: ", 1)[-1])


def run_lightning(argv: list[str]):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lorafit.callbacks.requeue import SIGTERM_EXIT
    from lorafit.cli.renamed import rename_fit_args
    from lorafit.io.write_errors import one_line_write_error

    verb = argv[0] if argv else None
    # `--print_config` alone prints the YAML with every option's help as a comment.
    argv = ["--print_config=comments" if a == "--print_config" else a for a in argv]
    argv = rename_fit_args(optimizer_name_as_group(argv), renamed_keys())
    run = _Run()
    cli_class, module_class, data_class, config_callback = _build_cli_class(run, verb)
    cli_class.refused_start = refused_start = RefusedStartCleanup()
    try:
        return _start(cli_class, module_class, data_class, config_callback, argv)
    except SIGTERMException:
        # Lightning's own stop (SIGTERM before lorafit's requeue callback listened): no checkpoint of
        # this moment exists, but the run did not finish, and status 0 would say it had.
        print(
            f"lorafit: stopped by SIGTERM before training could save a checkpoint (exit {SIGTERM_EXIT})",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT) from None
    except LorafitError as error:
        refused_start.undo()  # a check refused the start: the run folder is left as it was
        raise _worker_error(error) from None
    except Exception as error:
        converted = run.folder and one_line_write_error(error, run.folder, "trainer.default_root_dir")
        if converted:
            raise converted from error
        raise
    finally:
        run.release()


def _start(cli_class, module_class, data_class, config_callback, argv: list[str]):
    return cli_class(
        module_class,
        data_class,
        save_config_callback=config_callback,
        save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
        trainer_defaults={"default_root_dir": "runs/lorafit", "max_epochs": 10},
        seed_everything_default=0,
        # No --optimizer/--lr_scheduler (LightningCLI's): lorafit builds its optimizer and schedule from
        # model.* (kohya's names, per-part learning rates); LightningCLI's would get no parameters.
        auto_configure_optimizers=False,
        # exit_on_error=False: a bad key raises instead of printing the whole usage; main() prints one line.
        parser_kwargs={"description": "Train LoRA adapters on SD 1.x/2.x, SDXL and FLUX.1.", "exit_on_error": False},
        args=argv,
    )
