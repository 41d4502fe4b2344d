"""The plan of one epoch: who reads what, how often each sample appears, how many batches each yields.

A pure function of (index, seed, epoch, world size, workers per rank, batch size, bucket choice),
computed identically in every worker of every rank, so no process has to talk to another:

* **Read units.** Shards are shuffled per epoch and dealt to the ``world * workers`` reading
  slots, heaviest-first onto the lightest slot. A shard heavier than half a slot's fair share is
  split into interleaved parts (sample ``i`` of part ``p`` of ``P`` when ``i % P == p``), so small
  datasets still give every slot work and no slot reads another's samples.
* **Copies.** An instance sample appears ``repeats`` times (kohya's ``10_`` folders); the
  regularization samples share a quota of ``reg_ratio`` x the instance samples, spread over the
  reg pool by its repeats, the remainder rotating over epochs so every reg image gets its turn.
* **Batches.** A slot groups its samples by bucket and emits full batches as buckets fill and
  the partial ones at its end, so its batch count is ``sum(ceil(n_bucket / batch_size))``
  whatever the shuffle order: known before reading.
* **Equal ranks.** DDP needs every rank to run the same number of steps (a rank that stops early
  leaves the others waiting in an all-reduce forever). Ranks with fewer batches than the busiest
  yield some full batches as two half batches instead, so every sample is still seen exactly as
  often as planned. Only when a rank has too few samples for that (tiny datasets on many ranks)
  are the last batches of the busiest workers cut; ``dropped_samples`` says how many samples that
  cost, and the DataModule logs it. Half batches weigh their samples a little more in that step,
  as kohya's partial bucket batches do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from lorafit.data.buckets import BucketChoice
from lorafit.data.shard_index import DatasetIndex

Size = tuple[int, int]
BucketOf = Callable[[tuple], BucketChoice]  # index entry -> its bucket (BucketSpec.chooser)


@dataclass(frozen=True)
class ReadUnit:
    """Samples ``i`` of shard ``shard`` with ``i % parts == part``."""

    shard: int
    part: int = 0
    parts: int = 1

    def takes(self, i: int) -> bool:
        return i % self.parts == self.part


@dataclass(frozen=True)
class EpochPlan:
    """Everything the readers of one epoch need; slots are numbered ``rank * workers + worker``.

    ``quotas[slot]`` is how many batches the slot yields: its natural count, minus the batches cut
    (busiest ranks, when splitting cannot even them out) plus ``splits[slot]``, the number of its
    first full batches it yields as two halves.
    """

    units: list[list[ReadUnit]]
    copies: list[list[int]]
    batches: list[int]
    quotas: list[int]
    splits: list[int]
    workers: int
    dropped_samples: int

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    @property
    def batches_per_rank(self) -> int:
        return sum(self.quotas[: self.workers])

    def resume_roles(self, rank: int, skip: int) -> list[tuple[int, int] | None]:
        """For each DataLoader worker of ``rank``: (planned worker it plays, batches to skip), or None.

        The DataLoader takes batches from its workers in turn, passing over finished ones, and
        always starts with worker 0. Replaying that order says which planned worker made each of
        the first ``skip`` batches and whose batch comes next; the restarted workers take the
        planned roles in that turn order, so the resumed batch sequence continues the interrupted one.
        """
        quotas = self.quotas[rank * self.workers : (rank + 1) * self.workers]
        order = [w for round_ in range(max(quotas, default=0)) for w, q in enumerate(quotas) if round_ < q]
        skips = [0] * self.workers
        for worker in order[:skip]:
            skips[worker] += 1
        turn = list(dict.fromkeys(order[skip:]))  # remaining workers, in the order their turns come
        return [(w, skips[w]) for w in turn] + [None] * (self.workers - len(turn))


def epoch_rng(seed: int, epoch: int, *parts) -> random.Random:
    """A generator that depends only on its arguments (string seeding is stable across runs)."""
    return random.Random(":".join(str(p) for p in (seed, epoch, *parts)))


def sample_copies(
    index: DatasetIndex,
    seed: int,
    epoch: int,
    reg_ratio: float,
    repeats: bool = True,
    repeats_override: int | None = None,
) -> list[list[int]]:
    """Times each sample appears in the epoch, per shard (see module docstring)."""
    copies: list[list[int]] = []
    reg_members: list[tuple[int, int, int]] = []  # (shard, i, weight)
    for s, shard in enumerate(index.shards):
        row = []
        for i, entry in enumerate(shard.samples):
            weight = (repeats_override or entry[2]) if repeats else 1
            if entry[3]:
                reg_members.append((s, i, max(1, entry[2] if repeats else 1)))
                row.append(0)
            else:
                row.append(weight)
        copies.append(row)
    if not reg_members:
        return copies
    if not repeats:  # evaluation: every sample once
        for s, i, _ in reg_members:
            copies[s][i] = 1
        return copies
    quota = round(reg_ratio * sum(sum(row) for row in copies))
    total_weight = sum(w for _, _, w in reg_members)
    given = 0
    for s, i, weight in reg_members:
        copies[s][i] = quota * weight // total_weight
        given += copies[s][i]
    # The remainder goes to a different part of the reg pool each epoch.
    order = list(range(len(reg_members)))
    epoch_rng(seed, epoch, "reg").shuffle(order)
    for k in order[: quota - given]:
        s, i, _ = reg_members[k]
        copies[s][i] += 1
    return copies


def _units(index: DatasetIndex, copies: list[list[int]], slots: int, seed: int, epoch: int) -> list[ReadUnit]:
    """Shards in epoch order, each split into enough interleaved parts that no part outweighs half a
    slot's fair share: fine enough for the greedy deal to balance, while datasets of many
    similar shards (the large ones) still read every shard exactly once."""
    shards = list(range(len(index.shards)))
    epoch_rng(seed, epoch, "shards").shuffle(shards)
    fair_share = max(1, sum(sum(row) for row in copies)) / slots
    units = []
    for s in shards:
        parts = max(1, math.ceil(2 * sum(copies[s]) / fair_share))
        parts = min(parts, max(1, len(copies[s])))
        units += [ReadUnit(s, p, parts) for p in range(parts)]
    return units


def _deal(units: list[ReadUnit], weights: list[int], slots: int, workers: int) -> list[list[ReadUnit]]:
    """Heaviest unit first onto the lightest slot, a stable greedy balance. Ties go to worker 0 of
    every rank before any rank's worker 1, so with few units every rank still gets some."""
    order = sorted(range(len(units)), key=lambda k: -weights[k])  # sorted() is stable: epoch order breaks ties
    loads = [0] * slots
    dealt: list[list[ReadUnit]] = [[] for _ in range(slots)]
    for k in order:
        slot = min(range(slots), key=lambda j: (loads[j], j % workers, j))
        dealt[slot].append(units[k])
        loads[slot] += weights[k]
    return dealt


def plan_epoch(
    index: DatasetIndex,
    bucket_of: BucketOf,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    workers: int,
    batch_size: int,
    reg_ratio: float = 1.0,
    repeats: bool = True,
    repeats_override: int | None = None,
) -> EpochPlan:
    """Plan one epoch (see module docstring).

    ``repeats=False`` plans an evaluation pass: each sample once. Epochs differ by a few batches
    (other shards per slot, other reg samples, so other partial batches); each is played in full.
    """
    workers = max(1, workers)
    slots = world_size * workers
    copies = sample_copies(index, seed, epoch, reg_ratio, repeats, repeats_override)
    units = _units(index, copies, slots, seed, epoch)
    weights = [sum(c for i, c in enumerate(copies[u.shard]) if u.takes(i)) for u in units]
    dealt = _deal(units, weights, slots, workers)

    batches, full, bucket_counts = [], [], []
    for slot_units in dealt:
        counts: dict[Size, int] = {}
        for unit in slot_units:
            samples = index.shards[unit.shard].samples
            for i, n in enumerate(copies[unit.shard]):
                if n and unit.takes(i):
                    bucket = bucket_of(samples[i]).bucket
                    counts[bucket] = counts.get(bucket, 0) + n
        bucket_counts.append(counts)
        batches.append(sum(math.ceil(n / batch_size) for n in counts.values()))
        full.append(sum(n // batch_size for n in counts.values()) if batch_size > 1 else 0)

    quotas, splits = _even_out(batches, full, world_size, workers)
    dropped = sum(
        _samples_in_last(bucket_counts[s], batch_size, batches[s] + splits[s] - quotas[s]) for s in range(slots)
    )
    return EpochPlan(dealt, copies, batches, quotas, splits, workers, dropped)


def _even_out(batches: list[int], full: list[int], world_size: int, workers: int) -> tuple[list[int], list[int]]:
    """Per-slot (quota, splits) giving every rank the same batch count, losing as few samples as possible.

    Ranks short of batches split full batches in two (every sample still seen once, in a smaller
    batch); only when even that cannot reach the busiest rank's count is everyone cut to the
    largest count all ranks can make.
    """

    def rank_slots(rank: int) -> range:
        return range(rank * workers, (rank + 1) * workers)

    totals = [sum(batches[s] for s in rank_slots(r)) for r in range(world_size)]
    reach = [totals[r] + sum(full[s] for s in rank_slots(r)) for r in range(world_size)]
    target = min(max(totals), *reach)
    quotas, splits = list(batches), [0] * len(batches)
    for rank in range(world_size):
        slots = rank_slots(rank)
        for _ in range(totals[rank] - target):  # cut: the last batches of the busiest worker
            slot = max(slots, key=lambda s: (quotas[s], s))
            quotas[slot] -= 1
        for _ in range(target - totals[rank]):  # split: where most full batches are left
            slot = max(slots, key=lambda s: (full[s] - splits[s], -s))
            splits[slot] += 1
            quotas[slot] += 1
    return quotas, splits


def _samples_in_last(counts: dict[Size, int], batch_size: int, cut: int) -> int:
    """Samples in a slot's last ``cut`` batches: its partial batches, flushed in bucket order, come last."""
    if cut <= 0:
        return 0
    partials = [n % batch_size for _, n in sorted(counts.items()) if n % batch_size]
    dropped = sum(partials[-cut:]) if cut <= len(partials) else sum(partials)
    return dropped + batch_size * max(0, cut - len(partials))
