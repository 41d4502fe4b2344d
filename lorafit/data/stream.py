"""The streaming half of the data path: read planned shards, shuffle, bucket-batch, transform.

Per DataLoader worker: take the shard parts the epoch plan gave this slot, emit each sample as
many times as the plan says, shuffle through a seeded buffer, group into one-bucket batches, and
only then decode. Which sample lands in which batch depends on the index and the seeds alone, not
on the bytes, so the worker plays its epoch twice: first on the index alone, to learn which
samples it trains (its rows of global batches; not those of batches skipped on resume or cut to
even the ranks), then for real, reading only those samples' bytes (:mod:`lorafit.data.shard_reader`:
local shards seek over the rest; ``pipe:`` commands and URLs are streamed).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lorafit.data.epoch_plan import EpochPlan, epoch_rng, plan_epoch
from lorafit.data.sample_transform import (
    CACHED_CONDITIONING,
    BucketSpec,
    SampleTransform,
    collate,
    decode_tensor,
    pick_cached,
)
from lorafit.data.shard_index import DatasetIndex
from lorafit.data.shard_reader import read_indexed


@dataclass
class Draw:
    """One appearance of a sample in the epoch: copy ``copy`` of sample ``i`` of shard ``shard``;
    ``sample`` is None while the epoch is played on the index alone, or when this reader does not train it."""

    shard: int
    i: int
    copy: int
    entry: tuple
    sample: dict | None


def shuffle_buffer(items: Iterable[Draw], size: int, rng: random.Random) -> Iterator[Draw]:
    """Seeded streaming shuffle: hold up to ``size`` items, emit a random one as each new one arrives."""
    buffer: list[Draw] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def bucket_batches(draws: Iterable[Draw], bucket_of, batch_size: int, splits: int = 0) -> Iterator[list[Draw]]:
    """Full batches as buckets fill (the first ``splits`` of them as two halves), then each bucket's
    partial batch in bucket order: exactly the count the epoch plan computed."""
    queues: dict[tuple[int, int], list[Draw]] = {}
    for draw in draws:
        queue = queues.setdefault(bucket_of(draw.entry).bucket, [])
        queue.append(draw)
        if len(queue) == batch_size:
            if splits:
                splits -= 1
                half = (batch_size + 1) // 2
                yield queue[:half]
                yield queue[half:]
            else:
                yield list(queue)
            queue.clear()
    for bucket in sorted(queues):
        if queues[bucket]:
            yield queues[bucket]


class ShardStream(IterableDataset):
    """Batches of one epoch for one rank; each DataLoader worker streams its own planned slot.

    ``rank``/``world_size`` are set by the DataModule from the trainer (environment variables are
    not set in spawned workers); ``epoch``/``skip`` are set before each epoch's workers start.
    """

    def __init__(
        self,
        index: DatasetIndex,
        spec: BucketSpec,
        transform: SampleTransform,
        *,
        batch_size: int,
        seed: int,
        reg_ratio: float,
        shuffle_buffer: int,
        training: bool,
        num_workers: int,
        repeats_override: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        global_batch: bool = False,
    ) -> None:
        self.index, self.spec, self.transform = index, spec, transform
        self.batch_size, self.seed, self.reg_ratio = batch_size, seed, reg_ratio
        self.buffer_size, self.training, self.num_workers = shuffle_buffer, training, num_workers
        self.repeats_override = repeats_override
        self.world_size, self.rank = world_size, rank
        # Global batches (training only): every rank plays the one-process plan with batches of
        # world_size x batch_size and keeps its share of each; see global_share().
        self.global_batch = global_batch and training
        self.epoch, self.skip = 0, 0
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of ``epoch`` (default: the one being played); each epoch has its own batch count."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            world = 1 if self.global_batch else self.world_size
            plan = plan_epoch(
                self.index,
                self.spec.chooser(),
                seed=self.seed,
                epoch=epoch if self.training else 0,
                world_size=world,
                workers=self.num_workers,
                batch_size=self._batch_size(),
                reg_ratio=self.reg_ratio,
                repeats=self.training,
                repeats_override=self.repeats_override,
            )
            # The epoch played and the next one (its length is asked for before it starts).
            self._plans = {e: p for e, p in self._plans.items() if e == self.epoch} | {epoch: plan}
        return self._plans[epoch]

    def __len__(self) -> int:
        return self.plan().batches_per_rank

    def _batch_size(self) -> int:
        """Samples per planned batch: a global batch spans every rank."""
        return self.batch_size * self.world_size if self.global_batch else self.batch_size

    def _planned_draws(self, plan: EpochPlan, slot: int) -> Iterator[Draw]:
        """The slot's draws from the index alone, in reading order: what :meth:`_read_draws` yields, without bytes."""
        for unit in plan.units[slot]:
            copies = plan.copies[unit.shard]
            for i, entry in enumerate(self.index.shards[unit.shard].samples):
                if copies[i] and unit.takes(i):
                    for copy in range(copies[i]):
                        yield Draw(unit.shard, i, copy, entry, None)

    def _read_draws(self, plan: EpochPlan, slot: int, wanted: set[tuple[int, int]]) -> Iterator[Draw]:
        """The slot's draws with the bytes of the ``wanted`` (shard, i) samples, the others without."""
        for unit in plan.units[slot]:
            shard = self.index.shards[unit.shard]
            copies = plan.copies[unit.shard]
            for i, sample in read_indexed(shard, lambda i, u=unit: u.takes(i) and (u.shard, i) in wanted):
                if copies[i] and unit.takes(i):
                    for copy in range(copies[i]):
                        yield Draw(unit.shard, i, copy, shard.samples[i], sample)

    def _batches(self, draws: Iterable[Draw], plan: EpochPlan, slot: int) -> Iterator[tuple[int, list[Draw]]]:
        """(n, draws of batch n) for the slot's planned batches: shuffled, bucketed, split and cut as planned."""
        if self.training and self.buffer_size > 1:
            draws = shuffle_buffer(draws, self.buffer_size, epoch_rng(self.seed, self.epoch, "buffer", slot))
        groups = bucket_batches(draws, self.spec.chooser(), self._batch_size(), plan.splits[slot])
        return itertools.islice(enumerate(groups), plan.quotas[slot])

    def _rows(self, group: list[Draw]) -> list[int]:
        """Positions in a planned batch that this rank trains: all, or its share of a global batch."""
        return global_share(len(group), self.rank, self.world_size)[0] if self.global_batch else list(range(len(group)))

    def _item(self, draw: Draw, bucket_of) -> dict[str, Any]:
        rng = epoch_rng(self.seed, self.epoch, draw.shard, draw.i, draw.copy)
        is_reg = bool(draw.entry[3])
        sample = draw.sample
        meta = json.loads(sample["json"]) if "json" in sample else {}
        # The source file's path when the shard records it: what a user recognises in an error.
        name = meta.get("source") or f"{PurePosixPath(self.index.shards[draw.shard].url).name}:{sample['__key__']}"
        item: dict[str, Any] = {"key": name, "is_reg": is_reg}
        item["caption"] = self.transform.caption(sample, rng, is_reg)
        if "latent.pth" in sample:
            moments, crop, mask = pick_cached(sample, rng, self.transform.flip_aug and self.training)
            item.update(latent_moments=moments, original_size=tuple(meta["original_size"]), crop_top_left=tuple(crop))
            item["loss_mask"] = mask
            for key in CACHED_CONDITIONING:
                if f"{key}.pth" in sample:
                    item[key] = decode_tensor(sample[f"{key}.pth"])
            return item
        pixels, mask, original, crop = self.transform.pixels_and_mask(sample, bucket_of(draw.entry), rng, name)
        item.update(pixel_values=pixels, original_size=original, crop_top_left=crop, loss_mask=mask)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != max(1, self.num_workers):
            raise RuntimeError(f"planned for {self.num_workers} workers, running in {info.num_workers}")
        if info is None and self.num_workers > 0:
            raise RuntimeError("planned for DataLoader workers but iterated in the main process")
        plan = self.plan()
        plan_rank = 0 if self.global_batch else self.rank  # global batches: every rank plays rank 0's plan
        role = plan.resume_roles(plan_rank, self.skip)[worker] if self.training else (worker, 0)
        if role is None:  # resuming: this worker's planned batches were all trained already
            return
        planned_worker, skip = role
        slot = plan.slot(plan_rank, planned_worker)
        # First pass, on the index: the samples this reader trains, so that the second reads only those.
        wanted = {
            (group[row].shard, group[row].i)
            for n, group in self._batches(self._planned_draws(plan, slot), plan, slot)
            if n >= skip
            for row in self._rows(group)
        }
        bucket_of = self.spec.chooser()
        for n, group in self._batches(self._read_draws(plan, slot, wanted), plan, slot):
            if n < skip:
                continue
            rows = self._rows(group)
            batch = collate([self._item(group[row], bucket_of) for row in rows])
            if self.global_batch:
                _, weights = global_share(len(group), self.rank, self.world_size)
                batch.update(global_size=len(group), global_rows=torch.tensor(rows), global_weights=weights)
            yield batch


def global_share(size: int, rank: int, world_size: int) -> tuple[list[int], torch.Tensor]:
    """Rank ``rank``'s rows of a global batch of ``size`` samples, and the weight of each in its loss.

    Rows ``rank, rank + world_size, ...``: the samples of a one-process batch dealt round robin.
    The loss weights make the all-reduce exact also for an uneven split: DDP averages the ranks'
    mean losses, so a row weighs ``world_size * len(rows) / size`` and every sample ends up with
    ``1 / size`` of the step, as in one process. A rank left without a sample (a global batch
    smaller than the world) takes row 0 again with weight 0: it runs the step without counting.
    """
    rows = list(range(rank, size, world_size))
    if not rows:
        return [0], torch.zeros(1)
    return rows, torch.full((len(rows),), world_size * len(rows) / size)
