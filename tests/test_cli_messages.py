"""What a user sees from the `lorafit` command before any training: no library noise, errors they can act on."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
from cli_runs import REPO, lorafit_env

from lorafit.cli import main
from lorafit.cli.startup import quiet_known_notices
from lorafit.cli.suggestions import closest_option, explain

# Lines libraries print at start-up that lorafit keeps off the screen (issue 22, point 5).
NOISE = ("gemm_4bit_forward", "kernels-community", "requires torchvision", "`IterableDataset` has `__len__`")
LIGHTNING_ITERABLE_LEN = (  # lightning/pytorch/utilities/data.py, Lightning 2.6
    "Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading "
    "(when num_workers > 1), `__len__` could be inaccurate if each worker is not configured independently to "
    "avoid having duplicate data."
)
# Runs `lorafit ARGS` in a fresh interpreter and reports whether bitsandbytes got imported.
PROBE = (
    "import sys\nfrom lorafit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print('bitsandbytes imported:', sys.modules.get('bitsandbytes') is not None, file=sys.stderr)"
)


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, env=lorafit_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--help",), ("convert", "--help"), ("fit", "--help"), ("tiny", "sd1")], ids=" ".join)
def test_verbs_print_no_library_noise_and_do_not_import_bitsandbytes(args, tmp_path):
    if args[0] == "tiny":  # a verb that loads diffusers models: their import pulled bitsandbytes in
        args = (*args, str(tmp_path / "tiny"))
    result = _probe(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["bitsandbytes imported: False"], result.stderr[-2000:]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_known_notices_are_dropped_by_their_text_and_other_warnings_of_the_same_loggers_still_show():
    quiet_known_notices()
    # On the loggers themselves: transformers' loggers do not propagate to the root once it set them up.
    bnb, transformers = (
        logging.getLogger("bitsandbytes.backends.cpu.ops"),
        logging.getLogger("transformers.utils.import_utils"),
    )
    collect = _Collect()
    levels = [logger.level for logger in (bnb, transformers)]
    for logger in (bnb, transformers):
        logger.addHandler(collect)
        logger.setLevel(logging.WARNING)  # tests/conftest.py quiets transformers by level (TRANSFORMERS_VERBOSITY)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
        bnb.warning("CUDA setup failed: libcudart.so not found")  # about the user's machine: shown
        transformers.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ..."
        )
        transformers.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
    finally:
        for logger, level in zip((bnb, transformers), levels):
            logger.removeHandler(collect)
            logger.setLevel(level)
    assert collect.messages == [
        "CUDA setup failed: libcudart.so not found",
        "`torch_dtype` is deprecated! Use `dtype` instead!",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_notices()  # catch_warnings reset the filters
        warnings.warn(LIGHTNING_ITERABLE_LEN, stacklevel=1)
        warnings.warn("The dataloader does not have many workers which may be a bottleneck.", stacklevel=1)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers which may be a bottleneck."]


def _one_line_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    return err[0]


def test_a_mistyped_key_names_the_closest_real_one_for_fit_and_tool_verbs(capsys):
    config = str(REPO / "configs" / "tiny-demo.yaml")
    error = _one_line_error(capsys, "fit", "--config", config, "--model.rnak", "16", "--max_epochs", "3")
    assert "--model.rnak: did you mean --model.network.rank?" in error
    assert "--max_epochs: did you mean --trainer.max_epochs?" in error
    assert "did you mean --base?" in _one_line_error(capsys, "convert", "a.safetensors", "b.safetensors", "--bsae", "x")
    assert "did you mean --strength?" in _one_line_error(capsys, "grid", "--strenght", "[1]")


def test_a_flag_is_named_as_typed_when_it_is_missing(capsys):
    error = _one_line_error(capsys, "caption")
    assert "the following arguments are required: dir, --model" in error


def test_lightning_optimizer_flags_are_not_offered_and_say_where_the_optimizer_is_configured(capsys):
    config = str(REPO / "configs" / "tiny-demo.yaml")
    error = _one_line_error(capsys, "fit", "--config", config, "--optimizer", "SGD", "--optimizer.lr", "0.1")
    assert "lorafit sets the optimizer under model: " in error and "--model.optimizer" in error
    assert "empty parameter list" not in error
    error = _one_line_error(capsys, "fit", "--config", config, "--lr_scheduler", "StepLR")
    assert "--model.optimizer.lr_scheduler" in error
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert "--optimizer " not in help_text and "--lr_scheduler " not in help_text
    assert "--model.optimizer" in help_text


def test_closest_option_compares_within_the_section_first_and_never_offers_a_section():
    options = ["--trainer", "--trainer.max_epochs", "--trainer.strategy", "--model", "--model.rank", "--model.alpha"]
    assert closest_option("--model.rnak", options) == "--model.rank"
    assert closest_option("--trainer.rank", options) == "--model.rank"  # the right key in another section
    assert closest_option("--trainer.strategi", options) == "--trainer.strategy"
    assert closest_option("--foo", options) is None
    assert explain("unrecognized arguments: --foo 1", options) == "unrecognized arguments: --foo 1"


def test_loading_a_model_prints_no_library_progress_bars_and_restores_them(tiny_models, capfd):
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" tqdm lines stay off the
    console while lorafit loads a base model (it logs what it loaded), and are on again afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from lorafit.families.loading import load_base_model

    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    capfd.readouterr()
    load_base_model(tiny_models["sd1"])
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err, err[-2000:]
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
