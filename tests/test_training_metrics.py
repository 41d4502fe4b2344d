"""``loss/epoch`` and ``loss/average`` (lorafit/callbacks/metrics.py, on torchmetrics) are means over every
training image: whatever the batch sizes, over DDP ranks that trained different numbers of images,
and across a resume in the middle of an epoch."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from training import logged_metrics, train

from lorafit.callbacks.metrics import TrainingMetrics

# (images in the batch, its loss) per step. Rank 1 is used by the DDP test only.
BATCHES = {0: [(3, 1.0), (1, 5.0), (2, 2.0)], 1: [(1, 2.0), (1, 4.0), (4, 0.5)]}


class _Recorder(Logger):
    """Every logged value, by name, in step order (rank 0 writes; Lightning's rank_zero_only logger)."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, list[float]] = {}

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(float(value))


class _KnownLosses(pl.LightningModule):
    """A module whose step loss is the batch's given value: the averages can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def train_dataloader(self):
        batches = [{"captions": ["x"] * n, "loss": torch.tensor(v)} for n, v in BATCHES[self.global_rank]]
        return torch.utils.data.DataLoader(batches, batch_size=None)

    def training_step(self, batch, batch_idx):
        return batch["loss"] + 0.0 * self.weight

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(devices: int = 1, root=None, **kwargs) -> dict[str, list[float]]:
    """Logged values by name, in step order (through a CSV file when ranks are spawned processes)."""
    from lightning.pytorch.loggers import CSVLogger

    recorder = _Recorder() if devices == 1 else CSVLogger(str(root), name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        log_every_n_steps=1,
        logger=recorder,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrainingMetrics(**kwargs)],
    )
    trainer.fit(_KnownLosses())
    if devices == 1:
        return recorder.values
    with open(root / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


def _mean(batches) -> float:
    return sum(n * v for n, v in batches) / sum(n for n, _ in batches)


def test_losses_are_means_over_images_not_over_steps():
    values = _fit(average_window=2)
    # (3*1 + 1*5 + 2*2) / 6 = 2.0; the mean of the step losses would be 2.67.
    assert values["loss/epoch"] == [pytest.approx(_mean(BATCHES[0]))]
    # The window of 2 steps, at steps 1, 2 and 3.
    expected = [_mean(BATCHES[0][:1]), _mean(BATCHES[0][:2]), _mean(BATCHES[0][1:3])]
    assert values["loss/average"] == pytest.approx(expected)


@pytest.mark.slow
def test_two_ddp_ranks_with_different_batch_sizes_log_the_mean_over_all_images(tmp_path):
    values = _fit(devices=2, root=tmp_path, average_window=2)
    both = BATCHES[0] + BATCHES[1]
    # Before torchmetrics: the mean over ranks of each rank's step mean, 2.42 here instead of 1.67.
    assert values["loss/epoch"] == [pytest.approx(_mean(both))]
    last_window = BATCHES[0][1:3] + BATCHES[1][1:3]
    assert values["loss/average"][-1] == pytest.approx(_mean(last_window))


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_logs_the_uninterrupted_runs_losses(tiny_models, demo_data, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    kwargs = dict(learning_rate=5e-3, batch_size=2, log_metrics=True)
    straight, _ = train(
        tiny_models["sd1"], demo_data, tmp_path / "straight", max_epochs=2, callbacks=[TrainingMetrics()], **kwargs
    )
    stop = straight.num_training_batches + 3  # inside the second epoch
    mid = ModelCheckpoint(dirpath=str(tmp_path / "mid"), every_n_train_steps=stop, save_top_k=-1, filename="mid")
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "stopped",
        max_epochs=2,
        max_steps=stop,
        callbacks=[TrainingMetrics(), mid],
        **kwargs,
    )
    train(
        tiny_models["sd1"],
        demo_data,
        tmp_path / "resumed",
        max_epochs=2,
        ckpt_path=str(tmp_path / "mid" / "mid.ckpt"),
        callbacks=[TrainingMetrics()],
        **kwargs,
    )
    epochs = logged_metrics(tmp_path / "straight", "loss/epoch")
    resumed = logged_metrics(tmp_path / "resumed", "loss/epoch")
    last = max(epochs)
    assert resumed[last] == pytest.approx(epochs[last], rel=1e-6), "the epoch's loss lost the steps before the stop"
    averages = logged_metrics(tmp_path / "straight", "loss/average")
    after = logged_metrics(tmp_path / "resumed", "loss/average")
    assert after and all(after[step] == pytest.approx(averages[step], rel=1e-6) for step in after)
