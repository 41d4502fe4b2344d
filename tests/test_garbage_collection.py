"""Training keeps Python's collector off the objects built before it (no full-collection pauses
mid-step), and gives them back afterwards, also when training fails."""

from __future__ import annotations

import gc

import pytest
from lightning.pytorch.callbacks import Callback
from training import train


class FrozenDuringSteps(Callback):
    def __init__(self, fail_at: int | None = None):
        self.frozen = []
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.frozen.append(gc.get_freeze_count())
        if trainer.global_step == self.fail_at:
            raise RuntimeError("stop here")


def test_objects_from_set_up_are_out_of_the_collectors_way_while_training(tiny_models, demo_data, tmp_path):
    seen = FrozenDuringSteps()
    train(tiny_models["sd1"], demo_data, tmp_path, max_epochs=1, max_steps=3, batch_size=1, callbacks=[seen])
    # The base model's modules, the libraries' objects: hundreds of thousands on the tiny model too.
    assert len(seen.frozen) == 3 and min(seen.frozen) > 50_000
    assert gc.get_freeze_count() == 0, "given back to the collector after training"


def test_a_failed_run_gives_the_objects_back(tiny_models, demo_data, tmp_path):
    seen = FrozenDuringSteps(fail_at=1)
    with pytest.raises(RuntimeError, match="stop here"):
        train(tiny_models["sd1"], demo_data, tmp_path, max_epochs=1, max_steps=3, batch_size=1, callbacks=[seen])
    assert seen.frozen and seen.frozen[0] > 50_000
    assert gc.get_freeze_count() == 0
