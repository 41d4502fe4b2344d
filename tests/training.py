"""Run short trainings the way `lorafit fit` does, without the CLI, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lorafit.callbacks.export import LoraExport
from lorafit.data.folder import FolderDataModule
from lorafit.module import LoraDiffusionModule


def train(model_dir: str, data_dir: str, root: Path, max_epochs: int = 1, ckpt_path: Optional[str] = None,
          seed: int = 0, max_steps: int = -1, batch_size: int = 2, precision: str = "32-true",
          export: Optional[dict] = None, callbacks: Optional[list] = None, logger=False,
          data_kwargs: Optional[dict] = None, trainer_kwargs: Optional[dict] = None, **module_kwargs):
    """Train and return (trainer, module); LoRA files land in ``root/lora``, checkpoints in ``root/checkpoints``.

    ``seed`` seeds the global RNGs only; the data order has its own fixed seed, as in a config file.
    """
    pl.seed_everything(seed)
    module_kwargs = {"rank": 4, "alpha": 2.0, "learning_rate": 1e-3, **module_kwargs}
    module = LoraDiffusionModule(model=model_dir, **module_kwargs)
    data = FolderDataModule(train_dir=data_dir, resolution=64, batch_size=batch_size, seed=0, **(data_kwargs or {}))
    trainer = pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        precision=precision,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoraExport(**{"name": "test", **(export or {})}), ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True,
                                                            save_top_k=0, every_n_epochs=1),
                   *(callbacks or [])],
        **(trainer_kwargs or {}),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module


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
