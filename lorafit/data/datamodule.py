"""LoraDataModule: the ``data:`` section of a config. Streams aspect-bucketed shards to every rank.

Two ways in, one path through: ``shards`` (a ``lorafit prepare``/``lorafit cache`` folder, a brace
pattern, ``pipe:``/http URLs) or ``train_dir`` (a kohya folder tree, prepared once into the cache
by ``prepare_data`` on one process per node, then streamed like any shards).

The epoch is planned before it is read (:mod:`lorafit.data.epoch_plan`), from the trainer's rank
and world size taken in ``setup()`` (spawned DataLoader workers have no RANK variables). The
plan's epoch is read from the trainer when the loader starts its workers, and a checkpoint
records how many batches of the epoch were trained, so a resumed run continues the interrupted
epoch's exact batch sequence instead of starting it again. Epochs differ by a few batches; each is
played in full (Lightning re-reads the length every epoch), and :meth:`LoraDataModule.stepping_batches`
gives LR schedulers the run's exact step count.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from lorafit.data.captions import CaptionOps
from lorafit.data.epoch_checks import check_cached_settings, check_epoch_size, log_plan
from lorafit.data.epoch_loader import EpochLoader
from lorafit.data.kohya_folders import IMAGE_EXTENSIONS, MAX_REPEATS
from lorafit.data.prepared_folders import has_image, prepare_folder, prepared_dir
from lorafit.data.sample_transform import BucketSpec, SampleTransform
from lorafit.data.shard_index import DatasetIndex, default_cache_dir, load_index
from lorafit.data.stream import ShardStream
from lorafit.data.worker_signals import sigterm_from_parent_only
from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")


class LoraDataModule(L.LightningDataModule):
    """Aspect-bucketed, repeat-aware, DDP-exact batches from webdataset shards or a kohya folder.

    Batches follow the contract of :meth:`lorafit.training.module.LoraDiffusionModule.denoising_loss`; all
    images of a batch share one bucket size.

    Args:
        train_dir: kohya-style folder tree (``10_ohwx dog/`` = 10 repeats, caption sidecars),
            prepared once into ``cache_dir`` (again only when a file changes). Or use ``shards``.
        reg_dir: With ``train_dir``: regularization folder(s) (e.g. ``1_dog/``) mixed into training.
        shards: Prepared data: a folder written by ``lorafit prepare``/``lorafit cache``, a brace
            pattern (``data/train-{000000..000127}.tar``), paths, or ``pipe:``/http URLs. ``pipe:CMD``
            runs CMD as a shell command; refused in configs read from a run folder and in SLURM jobs
            unless LORAFIT_ALLOW_PIPE=1 (docs/data.md).
        val_dir: Held-out kohya folder for ``loss/validation`` (fixed noise, so epochs compare).
        val_shards: Held-out shards instead of ``val_dir``.
        resolution: Training resolution; buckets hold at most resolution^2 pixels (512 SD1, 768
            SD2-v, 1024 SDXL).
        batch_size: Images per batch per device (kohya ``train_batch_size``).
        num_workers: DataLoader processes decoding images (0 = in the training process).
        caption_ext: Caption sidecar extension for ``train_dir``/``val_dir`` (.txt or .caption).
        repeats: Override every instance image's repeats (else the ``N_`` folder prefix counts).
        seed: Seed of the data order and augmentation; epoch e's batches depend only on it and e.
        enable_bucket: Aspect-ratio buckets (kohya ``enable_bucket``); off = square center crops.
        min_bucket_reso: Smallest bucket side (kohya ``min_bucket_reso``).
        max_bucket_reso: Largest bucket side (kohya ``max_bucket_reso``: 1024 SD1/2, 2048 SDXL).
        bucket_reso_steps: Bucket side granularity (64; SDXL also allows 32).
        bucket_no_upscale: Small images get their own smaller bucket, never upscaled.
        random_crop: Random instead of centred crop of the excess (kohya ``random_crop``).
        flip_aug: Random horizontal flips (kohya ``flip_aug``): for symmetric subjects only.
        color_aug: Random hue shift (kohya ``color_aug``).
        alpha_mask: With ``train_dir``/``val_dir``: a transparent image's alpha channel is its loss
            mask (kohya's ``alpha_mask``); a ``<stem>_mask.png`` beside an image is its mask either
            way. How masks weigh the loss: ``model.loss.mask_floor`` (docs/teaching-methods.md).
        trigger_word: Prepended as the first tag of instance captions lacking it (not reg captions).
        shuffle_caption: Shuffle the comma-separated tags (kohya ``shuffle_caption``).
        keep_tokens: Leading tags kept in place (kohya ``keep_tokens``; 1 keeps the trigger first).
        caption_separator: Tag separator (kohya ``caption_separator``).
        caption_dropout_rate: Chance of an empty caption (kohya ``caption_dropout_rate``).
        caption_tag_dropout_rate: Chance of dropping each tag (kohya ``caption_tag_dropout_rate``).
        reg_ratio: Regularization samples per instance sample in an epoch (kohya: 1.0).
        shuffle_buffer: Samples held by each worker's shuffle buffer (more = better mixing, more RAM).
        cache_dir: Where prepared folders and shard indexes go; default ``$LORAFIT_CACHE`` or
            ``~/.cache/lorafit``.
        worker_start_method: ``fork``, ``spawn`` or ``forkserver`` for the workers (default: platform's).
        global_batch: DDP only: every rank plays the one-process epoch and trains its share of each
            global batch of ``devices x batch_size`` samples, so N devices train exactly what one
            device would with an N times larger batch (same batches, noise and loss; float
            tolerance). Each rank reads only its own samples' bytes of local shards (``pipe:``/http
            shards are streamed whole on every rank); off = each rank reads its own shards.
    """

    def __init__(
        self,
        train_dir: str | None = None,
        reg_dir: str | list[str] | None = None,
        shards: str | list[str] | None = None,
        val_dir: str | None = None,
        val_shards: str | list[str] | None = None,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 0,
        caption_ext: str = ".txt",
        repeats: int | None = None,
        seed: int = 0,
        enable_bucket: bool = True,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
        random_crop: bool = False,
        flip_aug: bool = False,
        color_aug: bool = False,
        alpha_mask: bool = False,
        trigger_word: str | None = None,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_separator: str = ",",
        caption_dropout_rate: float = 0.0,
        caption_tag_dropout_rate: float = 0.0,
        reg_ratio: float = 1.0,
        shuffle_buffer: int = 256,
        cache_dir: str | None = None,
        worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
        global_batch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (train_dir is None) == (shards is None):
            raise LorafitError("set exactly one of data.train_dir (a kohya folder) and data.shards (prepared data)")
        if reg_dir is not None and train_dir is None:
            raise LorafitError(
                "data.reg_dir goes with data.train_dir; with data.shards, prepare the reg "
                "folder into the shards (`lorafit prepare SRC --reg DIR`)"
            )
        if val_dir is not None and val_shards is not None:
            raise LorafitError("set at most one of data.val_dir and data.val_shards")
        for key, value, low in (
            ("resolution", resolution, 8),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if value < low:
                raise LorafitError(f"data.{key} is {value}; use {low} or more")
        if resolution % 8:
            raise LorafitError(f"data.resolution is {resolution}; use a multiple of 8 (e.g. 512, 768, 1024)")
        if repeats is not None and not 1 <= repeats <= MAX_REPEATS:
            raise LorafitError(f"data.repeats is {repeats}; use 1 to {MAX_REPEATS}, or leave it unset for folder names")
        if reg_ratio < 0:
            raise LorafitError(f"data.reg_ratio is {reg_ratio}; use 0 or more (1.0 = as many reg as instance samples)")
        for key, folder in (("train_dir", train_dir), ("val_dir", val_dir)):
            if folder is not None and not Path(folder).expanduser().is_dir():
                raise LorafitError(f"data.{key} {folder} is not a folder; check the path")
            # A typo'd or empty folder should fail now, not after minutes of model loading.
            if folder is not None and not has_image(Path(folder).expanduser()):
                raise LorafitError(
                    f"data.{key} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the path"
                )
        self.spec = BucketSpec(
            resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale, enable_bucket
        )
        try:
            self.spec.table()  # a bad bucket setting fails now, with its key, not in a worker
        except LorafitError as err:
            raise LorafitError(f"data.{err}") from None
        captions = CaptionOps(
            trigger_word,
            shuffle_caption,
            keep_tokens,
            caption_separator,
            caption_dropout_rate,
            caption_tag_dropout_rate,
        )
        self.transform = SampleTransform(captions, "random" if random_crop else "center", flip_aug, color_aug)
        # Held-out samples: the same caption (with trigger word) every time, centred, unaugmented.
        self.eval_transform = SampleTransform(CaptionOps(trigger_word))
        self.resolution = resolution
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self._resume: tuple[int, int] | None = None
        self._playing: int | None = None

    # ---- sources ------------------------------------------------------------------------

    def _prepared_dir(self, folder: str, reg: str | list[str] | None) -> Path:
        hp = self.hparams
        return prepared_dir(self.cache_dir, folder, reg, f"{hp.caption_ext}:{self.spec}", hp.alpha_mask)

    def _prepare_folder(self, folder: str, reg) -> Path:
        return prepare_folder(self._prepared_dir(folder, reg), folder, reg, self.hparams)

    def _sources(self, split: str) -> tuple[Any, str]:
        hp = self.hparams
        if split == "train":
            if hp.train_dir is not None:
                return str(self._prepared_dir(hp.train_dir, hp.reg_dir)), "data.train_dir"
            return hp.shards, "data.shards"
        if hp.val_dir is not None:
            return str(self._prepared_dir(hp.val_dir, None)), "data.val_dir"
        return hp.val_shards, "data.val_shards"

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): the only place that writes.
        hp = self.hparams
        if hp.train_dir is not None:
            self._prepare_folder(hp.train_dir, hp.reg_dir)
        else:
            load_index(hp.shards, "data.shards", str(self.cache_dir))
        if hp.val_dir is not None:
            self._prepare_folder(hp.val_dir, None)
        elif hp.val_shards is not None:
            load_index(hp.val_shards, "data.val_shards", str(self.cache_dir))

    # ---- streams ------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (1, 0) if trainer is None else (int(trainer.world_size), int(trainer.global_rank))

    def _stream(self, index: DatasetIndex, training: bool) -> ShardStream:
        hp = self.hparams
        world_size, rank = self._world()
        return ShardStream(
            index,
            self.spec,
            self.transform if training else self.eval_transform,
            batch_size=hp.batch_size,
            seed=hp.seed,
            reg_ratio=hp.reg_ratio,
            shuffle_buffer=hp.shuffle_buffer,
            training=training,
            num_workers=hp.num_workers,
            repeats_override=hp.repeats,
            world_size=world_size,
            rank=rank,
            global_batch=hp.global_batch,
        )

    def setup(self, stage: str) -> None:
        if self.train_stream is None and stage == "fit":
            source, key = self._sources("train")
            index = load_index(source, key, str(self.cache_dir), scan=False)
            hp = self.hparams
            check_cached_settings(index.cached, key, hp.resolution, self.spec, hp, self.transform.captions.is_identity)
            self.train_stream = self._stream(index, training=True)
            first = self.train_stream.plan(0)
            world = self._world()[0]
            check_epoch_size(first, key, self.batch_size, world, hp.global_batch)
            if first.batches_per_rank == 0:
                raise LorafitError(
                    f"{key}: {sum(map(sum, first.copies))} samples per epoch cannot give each of {world} rank(s) "
                    f"x {max(1, self.hparams.num_workers)} worker(s) a batch; lower data.num_workers, "
                    "data.batch_size or trainer.devices, or add images/repeats"
                )
            self.index = index
            if self.trainer is not None:
                # Epochs differ by a few batches: Lightning must ask each epoch for its length (a
                # loader here is a cheap view of the one stream), or it would cut longer epochs.
                if self.trainer.reload_dataloaders_every_n_epochs not in (0, 1):
                    logger.warning(
                        "trainer.reload_dataloaders_every_n_epochs %d is taken as 1: lorafit plans every epoch "
                        "anew (their lengths differ), and a loader here is a cheap view of the data",
                        self.trainer.reload_dataloaders_every_n_epochs,
                    )
                self.trainer.reload_dataloaders_every_n_epochs = 1
            log_plan(first, self.batch_size, world, hp.global_batch, (index.summary or {}).get("loss_masks"))
        if self.val_stream is None and (self.hparams.val_dir or self.hparams.val_shards):
            source, key = self._sources("val")
            self.val_stream = self._stream(load_index(source, key, str(self.cache_dir), scan=False), training=False)

    def _upcoming(self) -> int:
        """The epoch Lightning is about to play, or plays (what it passes to samplers' set_epoch, too)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_progress.current.processed

    def _position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the epoch about to be iterated."""
        if self.trainer is None:
            return 0, 0
        epoch = self._upcoming()
        self._playing = epoch
        skip = 0
        if self._resume is not None:
            resume_epoch, resume_skip = self._resume
            self._resume = None
            skip = resume_skip if resume_epoch == epoch else 0
        return epoch, skip

    def _loader(self, stream: ShardStream, position, upcoming=lambda: 0) -> EpochLoader:
        hp = self.hparams
        return EpochLoader(
            stream,
            position,
            upcoming,
            num_workers=hp.num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=hp.worker_start_method if hp.num_workers else None,
            # scancel's SIGTERM must not kill the workers before the checkpoint is saved (worker_signals.py).
            worker_init_fn=partial(sigterm_from_parent_only, training_process=os.getpid()) if hp.num_workers else None,
        )

    def train_dataloader(self) -> EpochLoader:
        return self._loader(self.train_stream, self._position, self._upcoming)

    def stepping_batches(self) -> int | None:
        """Optimizer steps of the whole run, summed epoch by epoch, for LR schedulers; None where
        Lightning's ``estimated_stepping_batches`` applies (no epoch limit, limited train batches).

        Lightning multiplies the first epoch's batch count by ``max_epochs``, but epochs differ by
        a few batches here, and a cosine schedule run past its end climbs again.
        """
        trainer = self.trainer
        if trainer is None or self.train_stream is None or trainer.max_epochs in (None, -1):
            return None
        limit = trainer.limit_train_batches
        if not (isinstance(limit, float) and limit == 1):
            return None
        steps = 0
        for epoch in range(trainer.max_epochs):
            # Lightning steps every accumulate_grad_batches batches and on each epoch's last batch.
            steps += math.ceil(self.train_stream.plan(epoch).batches_per_rank / trainer.accumulate_grad_batches)
            if 0 <= trainer.max_steps <= steps:
                return trainer.max_steps
        return steps

    def val_dataloader(self):
        if self.val_stream is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":
                raise LorafitError("lorafit validate needs held-out images: set data.val_dir or data.val_shards")
            return []
        return self._loader(self.val_stream, lambda: (0, 0))

    # ---- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch being played and how many of its batches were trained."""
        trainer = self.trainer
        if trainer is None or self._playing is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= self.train_stream.plan(self._playing).batches_per_rank:  # over: a resume starts the next
            return {"epoch": self._playing + 1, "batches_done": 0}
        return {"epoch": self._playing, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches_done"]))

    # ---- facts for exported metadata ------------------------------------------------------

    @property
    def cached(self) -> dict | None:
        """What `lorafit cache` fixed in the training shards (model, buckets), or None for images."""
        index = getattr(self, "index", None)
        return index.cached if index is not None else None

    def unused_model_parts(self) -> set[str]:
        """Model parts no training or validation batch runs: ``vae`` when every dataset holds cached
        latents, ``text_encoders`` when they all hold cached text embeddings too (kept off the GPU)."""
        indexes = [stream.index for stream in (self.train_stream, self.val_stream) if stream is not None]
        if not indexes or not all(index.cached for index in indexes):
            return set()
        if all(index.cached.get("text_embeddings") for index in indexes):
            return {"vae", "text_encoders"}
        return {"vae"}

    @property
    def num_images(self) -> int | None:
        summary = getattr(self, "index", None) and self.index.summary
        return summary.get("instance_samples") if summary else None

    def tag_frequency(self) -> dict | None:
        summary = getattr(self, "index", None) and self.index.summary
        return summary.get("ss_tag_frequency") if summary else None
