"""Run by tests/test_data_ddp.py: a 2-rank CPU DDP fit that records which samples each rank trained on
and which samples' bytes it read from the shards.

Lightning's ``ddp`` strategy starts rank 1 by running this script again, as a real launch does.
Usage: python ddp_data_probe.py SHARDS OUT_DIR NUM_WORKERS START_METHOD EPOCHS [SEED [GLOBAL_BATCH]]
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lorafit.data import shard_reader
from lorafit.data.datamodule import LoraDataModule

READ: dict[str, int] = {"bytes": 0}
READ_KEYS: list[str] = []


class _CountingFile:
    """A shard file that counts the bytes read from it (headers, data, seek checks: everything)."""

    def __init__(self, file) -> None:
        self.file = file

    def read(self, *args):
        data = self.file.read(*args)
        READ["bytes"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _counting_open(path, mode="rb"):
    return _CountingFile(open(path, mode))


def _recording_read_shard(url, wanted):
    for i, key, sample in _READ_SHARD(url, wanted):
        if sample is not None:
            READ_KEYS.append(json.loads(sample["json"])["source"])
        yield i, key, sample


# Every read of the stream goes through lorafit.data.shard_reader (workers 0: in this process).
_READ_SHARD = shard_reader.read_shard
shard_reader.open = _counting_open
shard_reader.read_shard = _recording_read_shard


class RecordKeys(L.LightningModule):
    """Trains one scalar and writes, per epoch, the keys and tensor shape of every batch it saw and
    the batch count Lightning planned for the epoch."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = Path(out)
        self.seen: dict[int, list] = {}
        self.lengths: dict[int, float] = {}

    def on_train_epoch_start(self) -> None:
        self.lengths[self.current_epoch] = self.trainer.num_training_batches

    def training_step(self, batch, batch_idx):
        tensor = batch["pixel_values"] if "pixel_values" in batch else batch["latent_moments"]
        record = {"keys": batch["keys"], "shape": list(tensor.shape)}
        if "global_rows" in batch:
            record.update(rows=batch["global_rows"].tolist(), weights=batch["global_weights"].tolist())
        self.seen.setdefault(self.current_epoch, []).append(record)
        return (self.weight * tensor.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        record = {"epochs": self.seen, "lengths": self.lengths, "read_bytes": READ["bytes"], "read_keys": READ_KEYS}
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    shards, out, workers, start_method, epochs = sys.argv[1:6]
    seed = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    global_batch = len(sys.argv) > 7 and sys.argv[7] == "global"
    Path(out).mkdir(parents=True, exist_ok=True)
    data = LoraDataModule(
        shards=shards,
        batch_size=2,
        num_workers=int(workers),
        seed=seed,
        worker_start_method=None if start_method == "default" else start_method,
        resolution=64,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        global_batch=global_batch,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=int(epochs),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(RecordKeys(out), datamodule=data)


if __name__ == "__main__":
    main()
