"""Run by tests/test_data_ddp.py: a 2-rank CPU DDP fit that records which samples each rank trained on.

Lightning's ``ddp`` strategy starts rank 1 by running this script again, as a real launch does.
Usage: python ddp_data_probe.py SHARDS OUT_DIR NUM_WORKERS START_METHOD EPOCHS
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lorafit.data.datamodule import LoraDataModule


class RecordKeys(L.LightningModule):
    """Trains one scalar and writes, per epoch, the keys and pixel shape of every batch it saw."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.out = Path(out)
        self.seen: dict[int, list] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(
            {"keys": batch["keys"], "shape": list(batch["pixel_values"].shape)}
        )
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def main() -> None:
    shards, out, workers, start_method, epochs = sys.argv[1:6]
    Path(out).mkdir(parents=True, exist_ok=True)
    data = LoraDataModule(
        shards=shards,
        batch_size=2,
        num_workers=int(workers),
        seed=5,
        worker_start_method=None if start_method == "default" else start_method,
        resolution=64,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
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
