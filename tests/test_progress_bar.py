"""The training bar's epoch label and whole-run estimate (lorafit/callbacks/progress.py)."""

from __future__ import annotations

import math

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
