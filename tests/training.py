"""Run short trainings the way `lorafit fit` does, without the CLI, for tests."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lorafit.callbacks.export import LoraExport
from lorafit.cli.lightning_cli import LAST_CHECKPOINT
from lorafit.data.datamodule import LoraDataModule
from lorafit.training.checkpoint_io import AtomicCheckpointIO
from lorafit.training.module import LoraDiffusionModule


def tiny_data(data_dir: str, batch_size: int = 2, **kwargs) -> LoraDataModule:
    """The DataModule at the tiny models' 64 px (buckets from 64 to 128 px)."""
    settings = dict(resolution=64, batch_size=batch_size, seed=0, min_bucket_reso=64, max_bucket_reso=128)
    return LoraDataModule(**{"train_dir": data_dir, **settings, **kwargs})  # kwargs may swap train_dir for shards


def tiny_batch(data_dir: str, size: int = 2) -> dict:
    """The first ``size`` images of ``data_dir`` as one centred, unaugmented batch."""
    data = tiny_data(data_dir, batch_size=size, val_dir=data_dir)
    data.prepare_data()
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def train(
    model_dir: str,
    data_dir: str,
    root: Path,
    max_epochs: int = 1,
    ckpt_path: str | None = None,
    seed: int = 0,
    max_steps: int = -1,
    batch_size: int = 2,
    precision: str = "32-true",
    export: dict | None = None,
    trainer_kwargs: dict | None = None,
    log_metrics: bool = False,
    callbacks: list | None = None,
    logger=None,
    data_kwargs: dict | None = None,
    **module_kwargs,
):
    """Train and return (trainer, module); LoRA files land in ``root/lora``, checkpoints in ``root/checkpoints``.

    ``seed`` seeds the global RNGs only; the data order has its own fixed seed, as in a config file.
    ``log_metrics`` logs every step to ``root/metrics.csv`` (read it with :func:`logged_metrics`).
    """
    pl.seed_everything(seed)
    trainer_kwargs = {
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **(trainer_kwargs or {}),
    }
    extra_callbacks = trainer_kwargs.pop("callbacks", [])
    module_kwargs = {"rank": 4, "alpha": 2.0, "learning_rate": 1e-3, **module_kwargs}
    module = LoraDiffusionModule(model=model_dir, **module_kwargs)
    data = tiny_data(data_dir, batch_size, **(data_kwargs or {}))
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        precision=precision,
        logger=logger if logger is not None else (CSVLogger(str(root), name="", version="") if log_metrics else False),
        callbacks=[
            LoraExport(**{"name": "test", **(export or {})}),
            ModelCheckpoint(dirpath=str(root / "checkpoints"), **LAST_CHECKPOINT),
            *extra_callbacks,
            *(callbacks or []),
        ],
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


class DeferNonfiniteChecks(Callback):
    """Check each loss one step late, as training on a GPU does (on the CPU the NaN/Inf guard reads
    losses at once: lorafit/training/nonfinite.py)."""

    def setup(self, trainer, pl_module, stage):
        pl_module.nonfinite.defer = True


def logged_metrics(root: Path, name: str) -> dict[int, float]:
    """``{step: value}`` of metric ``name`` from a ``train(..., log_metrics=True)`` run."""
    with open(Path(root) / "metrics.csv") as handle:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(handle) if row.get(name)}


def fixed_unet_inputs(unet, seed: int = 1):
    """A fixed noisy-latent input for comparing UNet outputs (SDXL extras included when needed)."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [80.0, 64, 8, 0, 64, 64]]),
        }
    return (sample, torch.tensor([999, 250]), hidden), kwargs


@torch.no_grad()
def unet_output(unet, seed: int = 1) -> torch.Tensor:
    args, kwargs = fixed_unet_inputs(unet, seed)
    return unet(*args, **kwargs).sample
