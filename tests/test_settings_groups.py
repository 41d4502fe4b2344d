"""model.* settings: the groups, their flat spellings of earlier versions, and what is refused."""

from __future__ import annotations

import logging

import pytest

from lorafit.errors import LorafitError
from lorafit.training.config import NetworkConfig
from lorafit.training.module import LoraDiffusionModule

BASE = "lorafit/toyworld/base"  # shipped with lorafit; __init__ reads no weights


def test_flat_keys_of_earlier_versions_land_in_their_groups_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING):
        module = LoraDiffusionModule(BASE, rank=4, alpha=2, min_snr_gamma=5.0, learning_rate=1e-3)
    assert (module.network.rank, module.network.alpha) == (4, 2)
    assert module.loss_config.min_snr_gamma == 5.0
    assert module.optimizer_config.learning_rate == 1e-3
    assert "model.rank is now model.network.rank" in caplog.text
    assert module.hparams["network"]["rank"] == 4  # what checkpoints and config.yaml record


def test_a_flat_key_overrides_its_group_and_mappings_work_as_groups():
    module = LoraDiffusionModule(BASE, network={"rank": 8, "alpha": 8}, rank=16)
    assert isinstance(module.network, NetworkConfig)
    assert (module.network.rank, module.network.alpha) == (16, 8)


def test_an_unknown_setting_is_one_line_naming_it():
    with pytest.raises(LorafitError, match=r"model: unknown setting\(s\) \['rnak'\]"):
        LoraDiffusionModule(BASE, rnak=4)
