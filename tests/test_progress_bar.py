"""The training bar's epoch label and whole-run estimate (lorafit/callbacks/progress.py)."""

from __future__ import annotations

import math

import pytest

from lorafit.callbacks.progress import RunClock, epoch_label, format_duration


def test_epochs_are_counted_from_one_against_max_epochs():
    assert epoch_label(0, 2) == "Epoch 1/2"
    assert epoch_label(1, 2) == "Epoch 2/2"
    assert epoch_label(4, -1) == "Epoch 5"  # max_epochs -1: no epoch limit (max_steps ends the run)
    assert epoch_label(0, None) == "Epoch 1"


def test_the_run_estimate_extrapolates_the_pace_of_this_process_to_the_steps_left():
    clock = RunClock()
    assert clock.summary(0, 100, now=0.0) is None  # no pace yet
    clock.tick(40, now=10.0)  # a resumed run: its first step here is the 40th of the run
    clock.tick(41, now=99.0)  # later ticks do not move the start
    assert clock.summary(40, 100, now=10.0) is None
    assert clock.summary(50, 100, now=30.0) == "50% 1:40 left"  # 10 steps in 20 s, 50 to go
    assert clock.summary(100, 100, now=50.0) == "100% 0:00 left"
    assert clock.summary(50, math.inf, now=30.0) is None  # unknown run length
    assert format_duration(3723) == "1:02:03"


@pytest.mark.parametrize("deferred", [False, True], ids=["cpu-reads-at-once", "gpu-style-one-step-late"])
def test_the_bar_shows_the_loss_the_nan_guard_read(deferred, tiny_models, demo_data, tmp_path):
    """The bar's ``loss`` is the newest loss the NaN/Inf guard has read (on a GPU without waiting for
    the device), not a value logged through Lightning each step."""
    from lightning.pytorch.callbacks import Callback
    from training import DeferNonfiniteChecks, train

    from lorafit.callbacks.progress import LorafitProgressBar

    bar = LorafitProgressBar()

    class Record(Callback):
        def __init__(self):
            self.losses, self.shown = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.shown.append(bar.get_metrics(trainer, pl_module).get("loss"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    record = Record()
    trainer, _ = train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_steps=4,
        trainer_kwargs={
            "enable_progress_bar": True,
            "callbacks": [bar, record, *([DeferNonfiniteChecks()] * deferred)],
        },
    )
    # On the CPU the guard reads each loss in its step; checking one step late (a GPU), at the start
    # of step n it has read step n-2's.
    late = 2 if deferred else 1
    assert record.shown[:late] == [None] * late
    assert record.shown[late:] == pytest.approx(record.losses[: 4 - late], rel=1e-6)
    assert "loss" not in trainer.progress_bar_metrics, "not logged through Lightning each step any more"


def test_the_bar_is_drawn_at_most_every_interval_and_at_each_epochs_end(tiny_models, demo_data, tmp_path):
    """Redrawing the bar after every batch costs host time a fast GPU step does not have; each epoch's
    last batch is always drawn, so the bar ends at its full count."""
    from training import train

    from lorafit.callbacks.progress import LorafitProgressBar

    bar = LorafitProgressBar(min_interval_s=3600)
    drawn = []
    update = bar._update

    def record(progress_bar_id, current, visible=True):
        if progress_bar_id == bar.train_progress_bar_id:
            drawn.append(current)
        update(progress_bar_id, current, visible)

    bar._update = record
    trainer, _ = train(
        tiny_models["sd1"],
        demo_data,
        tmp_path,
        max_epochs=2,
        max_steps=-1,
        batch_size=2,
        trainer_kwargs={"enable_progress_bar": True, "callbacks": [bar]},
    )
    batches = trainer.num_training_batches
    assert batches > 2
    # The first batch (the bar appears with the run), then only each epoch's last one within the hour.
    assert drawn == [1, batches, batches]
