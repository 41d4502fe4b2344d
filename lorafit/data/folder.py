"""The minimal data path: a kohya-style image folder, square center crops, a seeded sampler.

This is the smallest DataModule that trains a real LoRA: no buckets, no caching, no shards.
It reads the same ``data:`` config section the streaming webdataset DataModule will, so configs
written against it keep working when the bucketed pipeline replaces it.

Order is a pure function of ``(seed, epoch, rank, world size)``: the sampler is a
``DistributedSampler`` built here with the trainer's rank and world size. Lightning keeps a
DistributedSampler it finds in place and calls its ``set_epoch`` before every epoch, so a resumed
run sees exactly the epoch order an uninterrupted run would, and DDP ranks see disjoint,
equally long slices (each rank gets the same number of batches, so no rank waits forever in a
collective for a peer that ran out of data).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Optional, Union, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lorafit.data.images import load_rgb, resize_center_crop
from lorafit.data.kohya_folders import ImageRecord, scan_image_folder
from lorafit.errors import LorafitError


class FolderImageDataset(Dataset):
    """Map-style dataset over image records, each listed ``record.repeats`` times.

    Repeats are materialised as repeated indices (kohya's semantics: an image in ``10_x`` counts
    ten times per epoch) so that the sampler's shuffle spreads the copies across the epoch.
    """

    def __init__(self, records: Sequence[ImageRecord], resolution: int) -> None:
        self.records = list(records)
        self.resolution = resolution
        self.index = [i for i, record in enumerate(self.records) for _ in range(record.repeats)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        record = self.records[self.index[idx]]
        pixels, original_size, crop_top_left = resize_center_crop(load_rgb(record.path), self.resolution)
        return {
            "pixel_values": pixels,
            "caption": record.training_caption,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "key": str(record.path),
        }


def collate_folder_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks samples into the batch contract every lorafit DataModule produces."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "keys": [s["key"] for s in samples],
    }


class FolderDataModule(L.LightningDataModule):
    """Square center-cropped images and captions from a kohya-style folder tree.

    Batches are dicts: ``pixel_values`` float ``[B, 3, H, W]`` in ``[-1, 1]``, ``captions``
    list of str, ``original_size`` and ``crop_top_left`` long ``[B, 2]`` as (h, w) and
    (top, left) for SDXL micro-conditioning, ``keys`` list of source paths.

    Args:
        train_dir: Folder holding kohya concept folders such as ``10_ohwx dog/`` (10 repeats,
            captions fall back to "ohwx dog") with ``<image stem>.txt`` caption files.
        resolution: Side of the square training crop in pixels (multiple of 8): 512 for
            SD 1.x, 768 for SD 2.x-v, 1024 for SDXL.
        batch_size: Images per batch on each device.
        num_workers: DataLoader worker processes decoding images (0 decodes in the main process).
        caption_ext: Extension of the caption sidecar files, e.g. ``.txt`` or ``.caption``.
        repeats: If set, every image is seen this many times per epoch, overriding the
            ``N_`` prefix of the folder names.
        seed: Seed of the shuffle; the order of epoch e depends only on (seed, e).
        val_dir: Optional folder of held-out images + captions (same layout, repeats ignored)
            for ``loss/validation``, measured at fixed noise and timesteps so epochs compare.
    """

    def __init__(
        self,
        train_dir: str,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        caption_ext: str = ".txt",
        repeats: Optional[int] = None,
        seed: int = 0,
        val_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if resolution < 8 or resolution % 8:
            raise LorafitError(
                f"data.resolution is {resolution}; use a positive multiple of 8 (the VAE works on 8x8 "
                "pixel blocks), e.g. 512 for SD 1.x or 1024 for SDXL"
            )
        if batch_size < 1:
            raise LorafitError(f"data.batch_size is {batch_size}; use 1 or more")
        if num_workers < 0:
            raise LorafitError(f"data.num_workers is {num_workers}; use 0 or more")
        if repeats is not None and repeats < 1:
            raise LorafitError(
                f"data.repeats is {repeats}; use 1 or more, or leave it unset to use the folder names"
            )
        self.save_hyperparameters()
        self.train_dir = train_dir
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

        # Scanning here, not in setup(): it only reads names and small text files, and a typo in
        # train_dir should fail before minutes are spent loading a base model.
        records = scan_image_folder(train_dir, caption_ext)
        if repeats is not None:
            records = [dataclasses.replace(r, repeats=repeats) for r in records]
        self.records: list[ImageRecord] = records
        self.dataset = FolderImageDataset(records, resolution)
        self.val_dir = val_dir
        self.val_dataset = None
        if val_dir is not None:
            val_records = [dataclasses.replace(r, repeats=1) for r in scan_image_folder(val_dir, caption_ext)]
            self.val_dataset = FolderImageDataset(val_records, resolution)

    @property
    def num_images(self) -> int:
        """Distinct image files found."""
        return len(self.records)

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks: images times their repeats."""
        return len(self.dataset)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and run metadata: images, samples per epoch and each folder's share."""
        folders: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = folders.setdefault(record.folder, {"images": 0, "repeats": record.repeats})
            entry["images"] += 1
        return {
            "train_dir": self.train_dir,
            "num_images": self.num_images,
            "num_samples_per_epoch": self.num_samples,
            "resolution": self.resolution,
            "folders": folders,
        }

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency`` metadata: ``{folder: {tag: images carrying it}}``.

        Tags are the comma-separated parts of each image's training caption, stripped and
        lower-cased as kohya does; an image counts once whatever its repeats, as in kohya.
        """
        frequency: dict[str, Counter] = {}
        for record in self.records:
            tags = (tag.strip().lower() for tag in record.training_caption.split(","))
            frequency.setdefault(record.folder, Counter()).update(tag for tag in tags if tag)
        return {folder: dict(counts) for folder, counts in frequency.items()}

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached trainer; (1, 0) when used on its own."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        # Always a DistributedSampler, even on one device: with num_replicas=1 it is a seeded
        # shuffle whose epoch order Lightning advances via set_epoch, so single-device and DDP
        # runs share one code path and one notion of "epoch e's order".
        sampler = DistributedSampler(
            self.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=self.seed,
            # drop_last=False pads by repeating a few samples so every rank gets the same count.
            drop_last=False,
        )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_folder_batch,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_dataset is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":
                raise LorafitError("lorafit validate needs held-out images: set data.val_dir to a folder of them")
            return []  # no validation during fit
        world_size, rank = self._world()
        sampler = DistributedSampler(self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(self.val_dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_folder_batch)

