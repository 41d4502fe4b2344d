"""Two real DDP ranks (CPU, gloo) over the streaming DataModule: disjoint samples, equal batch counts.

Uneven shards and fewer shards than ranks x workers are the cases that hang naive webdataset
setups; spawned workers are the case where rank environment variables are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_data_stream import BUCKETS, FOLDERS, REG, _source_meta, _write

from lorafit.data.prepare import prepare

PROBE = Path(__file__).with_name("ddp_data_probe.py")


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
    return sets


# Spawned workers start a fresh Python per worker and epoch (slow on 2 cores): one epoch suffices there.
@pytest.mark.parametrize(
    ("shards", "workers", "start_method", "epochs"), [("uneven", 0, "default", 2), ("single", 2, "spawn", 1)]
)
def test_two_ranks_see_disjoint_samples_and_equal_batches(shard_sets, tmp_path, shards, workers, start_method, epochs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROBE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(PROBE), str(shard_sets[shards]), str(tmp_path), str(workers), start_method, str(epochs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    meta = _source_meta(shard_sets[shards])
    for epoch in [str(e) for e in range(epochs)]:
        per_rank = [Counter(k for batch in rank[epoch] for k in batch["keys"]) for rank in ranks]
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) > 0, "ranks ran different numbers of batches"
        assert not set(per_rank[0]) & set(per_rank[1]), "a sample was trained on both ranks"
        together = per_rank[0] + per_rank[1]
        for key, m in meta.items():
            if not m["is_reg"]:
                assert together[key] == m["repeats"], (key, together[key])
        for rank in ranks:
            for batch in rank[epoch]:
                assert batch["shape"][0] == len(batch["keys"])
