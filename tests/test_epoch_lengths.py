"""Each epoch is played in full at its own planned length, and LR schedules end on the run's last step.

Epochs differ by a few batches (other shards per reader and other regularization samples each
epoch, so other partial batches). Lightning reads the loader's length once unless reloading, and
cuts an epoch at that length; its step estimate for schedulers is the first epoch's count times
``max_epochs``.
"""

from __future__ import annotations

import math
from collections import Counter

import lightning.pytorch as pl
import pytest
from test_data_stream import BUCKETS, FOLDERS, REG, _source_meta, _write

from lorafit.data.datamodule import LoraDataModule
from lorafit.data.prepare import prepare
from lorafit.training.module import LoraDiffusionModule


class _Record(pl.Callback):
    def __init__(self) -> None:
        self.lengths: list[float] = []
        self.keys: dict[int, list[str]] = {}
        self.batches: Counter = Counter()
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lengths.append(trainer.num_training_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.setdefault(trainer.current_epoch, []).extend(batch["keys"])
        self.batches[trainer.current_epoch] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """test_data_stream's shards: 12 images and 3 reg images, 4 per shard."""
    base = tmp_path_factory.mktemp("epochs")
    _write(base / "train", FOLDERS, 1)
    _write(base / "reg", REG, 2)
    prepare(str(base / "train"), out=str(base / "shards"), reg=str(base / "reg"), max_samples_per_shard=4, **BUCKETS)
    return base / "shards"


@pytest.mark.slow
def test_every_epoch_in_full_and_a_cosine_schedule_ends_at_zero(tiny_models, prepared, tmp_path):
    # Seed 3 plans 20, 21 and 20 batches: the second epoch is longer than the first, the third shorter.
    data = LoraDataModule(shards=str(prepared), seed=3, batch_size=2, **BUCKETS)
    module = LoraDiffusionModule(
        model=tiny_models["sd1"], rank=4, learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=0
    )
    record = _Record()
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=data)
    planned = [data.train_stream.plan(epoch).batches_per_rank for epoch in range(3)]
    assert planned == [20, 21, 20]
    assert [record.batches[epoch] for epoch in range(3)] == planned
    assert record.lengths == planned  # what Lightning took as each epoch's length (progress bar, accumulation)
    meta = _source_meta(prepared)
    for epoch in range(3):
        seen = Counter(record.keys[epoch])
        assert all(seen[key] == m["repeats"] for key, m in meta.items() if not m["is_reg"]), epoch
    # Optimizer steps: every second batch and each epoch's last; the schedule was sized to them.
    steps = sum(math.ceil(n / 2) for n in planned)
    assert trainer.global_step == data.stepping_batches() == steps == 31
    assert record.lrs[-1] == pytest.approx(0.0, abs=1e-12) and max(record.lrs) > 5e-4
