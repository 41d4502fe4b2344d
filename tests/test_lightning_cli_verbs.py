"""`lorafit fit` / `lorafit validate` build only the parser of the verb being run, and lose nothing by it."""

from __future__ import annotations

import pytest
from cli_runs import DEMO_CONFIG
from jsonargparse import capture_parser

from lorafit.cli import main
from lorafit.cli.lightning_cli import run_lightning
from lorafit.cli.suggestions import parser_options


def _verbs_of(parser) -> set[str]:
    return set(parser._subcommands_action.choices)


@pytest.mark.parametrize(
    ("verb", "own_option"),
    [("fit", "--ckpt_path"), ("validate", "--verbose")],  # arguments of Trainer.fit / Trainer.validate
)
def test_each_verb_builds_its_own_parser_alone_with_its_trainer_arguments(verb, own_option):
    # Each parser holds every option of the trainer, module, data module and callbacks: building
    # all four of LightningCLI's (fit, validate, test, predict) was most of the CLI's start-up.
    parser = capture_parser(lambda: run_lightning([verb, "--config", str(DEMO_CONFIG)]))
    assert _verbs_of(parser) == {verb}
    options = parser_options(parser, verb)
    assert own_option in options and "--model.network.rank" in options and "--checkpoint.every_n_epochs" in options


@pytest.mark.parametrize("verb", ["fit", "validate"])
def test_help_of_each_verb_still_shows_the_options_docstrings(verb, capsys):
    with pytest.raises(SystemExit) as exited:
        main([verb, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert f"[options] {verb}" in text
    assert "LoRA rank (kohya's ``network_dim``)" in text  # the module's settings
    assert "--data.train_dir" in text and "--export.every_n_epochs" in text and "--trainer.max_epochs" in text


def test_test_and_predict_are_not_lorafit_verbs(capsys):
    for verb in ("test", "predict"):
        with pytest.raises(SystemExit) as exited:
            main([verb, "--config", str(DEMO_CONFIG)])
        assert exited.value.code == 2
        assert f"unknown verb '{verb}'" in capsys.readouterr().err
