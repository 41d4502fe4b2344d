"""Two real DDP ranks (CPU, gloo) over the streaming DataModule: disjoint samples, equal batch counts,
every epoch played in full at its own length, and global batches read rank-locally.

Uneven shards and fewer shards than ranks x workers are the cases that hang naive webdataset
setups; spawned workers are the case where rank environment variables are missing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_data_stream import BUCKETS, FOLDERS, REG, _source_meta, _write

from lorafit.data.epoch_plan import plan_epoch
from lorafit.data.prepare import prepare
from lorafit.data.sample_transform import BucketSpec
from lorafit.data.shard_index import load_index

pytestmark = pytest.mark.slow  # subprocesses: DDP ranks, SLURM jobs, a browser, killed trainings

PROBE = Path(__file__).with_name("ddp_data_probe.py")
NOISE = {"1_ohwx dog": [(96, 64), (64, 96), (64, 64), (128, 64), (64, 64), (96, 64)], "1_style": [(64, 64)] * 5}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    _write(base / "train", FOLDERS, 1)
    _write(base / "reg", REG, 2)
    sets = {}
    # 12 samples in shards of 5, 5, 2 (uneven), and in one shard (fewer shards than 2 ranks x 2 workers).
    for name, per_shard in (("uneven", 5), ("single", 100)):
        reg = str(base / "reg")
        prepare(str(base / "train"), out=str(base / name), reg_dir=reg, max_samples_per_shard=per_shard, **BUCKETS)
        sets[name] = base / name
    # Noise images, their bytes outweigh the tar headers (so bytes read show who read what); one
    # repeat each: with kohya repeats a sample's copies land on rows of several ranks, each reading it.
    rng = random.Random(3)
    for folder, sizes in NOISE.items():
        for n, (w, h) in enumerate(sizes):
            path = base / "noise" / folder / f"img{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)).save(path)
            path.with_suffix(".txt").write_text(f"{folder.split('_', 1)[1]}, picture {n}")
    prepare(str(base / "noise"), out=str(base / "noise-shards"), max_samples_per_shard=4, **BUCKETS)
    sets["noise"] = base / "noise-shards"
    return sets


def _run_probe(shards: Path, out: Path, workers: int, start_method: str, epochs: int, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE.parent), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"  # two ranks (and their workers) on two cores: one torch thread each
    result = subprocess.run(
        [sys.executable, str(PROBE), str(shards), str(out), str(workers), start_method, str(epochs), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _planned_lengths(shards: Path, seed: int, workers: int, epochs: int) -> list[int]:
    index = load_index(str(shards), "data.shards")
    choose = BucketSpec(**BUCKETS).chooser()
    return [
        plan_epoch(index, choose, seed=seed, epoch=e, world_size=2, workers=workers, batch_size=2).batches_per_rank
        for e in range(epochs)
    ]


# Spawned workers start a fresh Python per worker and epoch (slow on 2 cores): one epoch suffices there.
# Seed 7 on the single shard plans 11, 12, 12 batches per rank: later epochs are longer than the first.
@pytest.mark.parametrize(
    ("shards", "workers", "start_method", "epochs", "seed"),
    [("uneven", 0, "default", 2, 5), ("single", 2, "spawn", 1, 5), ("single", 0, "default", 3, 7)],
)
def test_two_ranks_see_disjoint_samples_and_equal_batches(
    shard_sets, tmp_path, shards, workers, start_method, epochs, seed
):
    ranks = _run_probe(shard_sets[shards], tmp_path, workers, start_method, epochs, str(seed))
    meta = _source_meta(shard_sets[shards])
    planned = _planned_lengths(shard_sets[shards], seed, workers, epochs)
    for epoch in range(epochs):
        batches = [rank["epochs"][str(epoch)] for rank in ranks]
        per_rank = [Counter(k for batch in rank_batches for k in batch["keys"]) for rank_batches in batches]
        # Each epoch in full, at its own planned length, which Lightning was told at the epoch's start.
        assert len(batches[0]) == len(batches[1]) == planned[epoch] > 0, "ranks ran other numbers of batches"
        assert all(rank["lengths"][str(epoch)] == planned[epoch] for rank in ranks)
        assert not set(per_rank[0]) & set(per_rank[1]), "a sample was trained on both ranks"
        together = per_rank[0] + per_rank[1]
        for key, m in meta.items():
            if not m["is_reg"]:
                assert together[key] == m["repeats"], (epoch, key, together[key])
        for rank_batches in batches:
            for batch in rank_batches:
                assert batch["shape"][0] == len(batch["keys"])
    if seed == 7:
        assert len(set(planned)) > 1, "the epochs should differ in length"


def test_global_batches_read_only_each_ranks_own_samples(shard_sets, tmp_path):
    """With data.global_batch each rank reads the bytes of the samples of its rows, not every shard:
    about half of them each, where before every rank read every shard."""
    shards = shard_sets["noise"]
    ranks = _run_probe(shards, tmp_path, 0, "default", 1, "3", "global")
    total = sum(path.stat().st_size for path in shards.glob("train-*.tar"))
    meta = _source_meta(shards)
    trained = []
    for rank in ranks:
        batches = rank["epochs"]["0"]
        keys = {key for batch in batches for key in batch["keys"]}
        trained.append(Counter(k for b in batches for k, w in zip(b["keys"], b["weights"]) if w > 0))
        assert set(rank["read_keys"]) == keys, "a rank read samples it does not train"
        assert len(rank["read_keys"]) == len(keys), "a rank read a sample twice"
        # Its own samples' bytes and the tar headers; all of it would be `total`.
        assert rank["read_bytes"] < 0.7 * total, (rank["read_bytes"], total)
    # Together the ranks trained each sample exactly `repeats` times (weight 0 rows aside).
    assert trained[0] + trained[1] == Counter({key: m["repeats"] for key, m in meta.items()})
    assert len(ranks[0]["epochs"]["0"]) == len(ranks[1]["epochs"]["0"])
