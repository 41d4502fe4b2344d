"""The streaming DataModule: repeats, reg ratio, one shape per batch, equal disjoint ranks, resume."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorafit.data.datamodule import LoraDataModule
from lorafit.data.epoch_plan import plan_epoch
from lorafit.data.prepare import prepare
from lorafit.data.sample_transform import BucketSpec
from lorafit.data.shard_index import DatasetIndex, ShardIndex, load_index
from lorafit.errors import LorafitError

BUCKETS = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
# folder -> (repeats, sizes): landscape, portrait and square images land in different buckets.
FOLDERS = {
    "3_ohwx dog": [(96, 64), (64, 96), (64, 64), (128, 64)],
    "2_sks cat": [(64, 64), (70, 64), (64, 128)],
    "1_style": [(96, 64), (64, 64)],
}
REG = {"1_dog": [(64, 64), (96, 64), (64, 96)]}


def _write(root: Path, folders: dict, seed: int) -> None:
    rng = random.Random(seed)
    for folder, sizes in folders.items():
        for n, size in enumerate(sizes):
            path = root / folder / f"img{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3))).save(path)
            path.with_suffix(".txt").write_text(f"{folder.split('_', 1)[1]}, picture {n}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("stream")
    _write(base / "train", FOLDERS, 1)
    _write(base / "reg", REG, 2)
    reg = str(base / "reg")
    prepare(str(base / "train"), out=str(base / "shards"), reg_dir=reg, max_samples_per_shard=4, **BUCKETS)
    return base / "shards"


def _epoch(dm: LoraDataModule, epoch: int = 0, skip: int = 0) -> list[dict]:
    loader = dm.train_dataloader()
    loader.position = lambda: (epoch, skip)
    return list(loader)


def _module(prepared: Path, **kwargs) -> LoraDataModule:
    dm = LoraDataModule(shards=str(prepared), **{"seed": 3, "batch_size": 2, **BUCKETS, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _source_meta(prepared: Path) -> dict[str, dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in prepared.glob("train-*.tar"))
    return {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)}


def test_epoch_repeats_reg_ratio_and_one_shape_per_batch(prepared):
    dm = _module(prepared, reg_ratio=0.5)
    meta = _source_meta(prepared)
    batches = _epoch(dm)
    assert len(batches) == len(dm.train_dataloader())
    seen = Counter(key for batch in batches for key in batch["keys"])
    instance = {k: m for k, m in meta.items() if not m["is_reg"]}
    # Every instance image exactly `repeats` times.
    assert {k: seen[k] for k in instance} == {k: m["repeats"] for k, m in instance.items()}
    instance_total = sum(m["repeats"] for m in instance.values())  # 3*4 + 2*3 + 1*2 = 20
    reg_seen = sum(n for k, n in seen.items() if meta[k]["is_reg"])
    assert reg_seen == round(0.5 * instance_total) == 10
    spec = BucketSpec(**BUCKETS).chooser()
    for batch in batches:
        shapes = {tuple(x.shape) for x in batch["pixel_values"]}
        assert len(shapes) == 1, "a batch mixes bucket shapes"
        for key in batch["keys"]:
            bucket = spec((meta[key]["w"], meta[key]["h"])).bucket
            assert batch["pixel_values"].shape[-2:] == (bucket[1], bucket[0])
        assert batch["is_reg"].tolist() == [meta[k]["is_reg"] for k in batch["keys"]]
    # Reg captions are the class prompt from their caption files, never with a trigger word.
    dm_trigger = _module(prepared, trigger_word="ohwx", reg_ratio=0.5)
    for batch in _epoch(dm_trigger):
        for caption, is_reg in zip(batch["captions"], batch["is_reg"]):
            assert caption.startswith("ohwx") != bool(is_reg)


def test_epochs_are_reproducible_and_differ(prepared):
    first = [b["keys"] for b in _epoch(_module(prepared))]
    again = [b["keys"] for b in _epoch(_module(prepared))]
    other = [b["keys"] for b in _epoch(_module(prepared), epoch=1)]
    assert first == again
    assert first != other


def test_resume_skips_exactly_the_trained_batches_with_workers(prepared):
    dm = _module(prepared, num_workers=2)
    full = [b["keys"] for b in _epoch(dm, epoch=2)]
    tail = [b["keys"] for b in _epoch(dm, epoch=2, skip=5)]
    assert tail == full[5:]
    pixels = [b["pixel_values"] for b in _epoch(dm, epoch=2)][5:]
    assert all(torch.equal(a["pixel_values"], b) for a, b in zip(_epoch(dm, epoch=2, skip=5), pixels))


def _as_rank(dm: LoraDataModule, rank: int, world_size: int) -> LoraDataModule:
    """``dm``'s training stream as rank ``rank`` of ``world_size`` would play it (no trainer needed)."""
    stream = dm.train_stream
    stream.rank, stream.world_size, stream._plans = rank, world_size, {}
    return dm


@pytest.mark.parametrize("world_size,workers", [(2, 0), (3, 2)])
def test_global_batches_deal_the_one_process_batches_over_the_ranks(prepared, world_size, workers):
    """Rank r of N gets rows r, r+N, ... of each batch one process makes with an N times larger batch,
    with loss weights that make the ranks' averaged mean losses the one-process mean."""
    one = _epoch(_module(prepared, batch_size=2 * world_size, num_workers=workers), epoch=1, skip=1)
    ranks = [
        _epoch(_as_rank(_module(prepared, global_batch=True, num_workers=workers), r, world_size), epoch=1, skip=1)
        for r in range(world_size)
    ]
    assert all(len(batches) == len(one) for batches in ranks)
    uneven = 0
    for step, full in enumerate(one):
        shares = [batches[step] for batches in ranks]
        assert all(share["global_size"] == len(full["keys"]) for share in shares)
        # Each of the full batch's samples is trained by exactly one rank, with the same pixels.
        owned = {}
        for share in shares:
            for row, key, pixels, weight in zip(
                share["global_rows"].tolist(), share["keys"], share["pixel_values"], share["global_weights"].tolist()
            ):
                assert key == full["keys"][row] and torch.equal(pixels, full["pixel_values"][row])
                if weight:
                    assert row not in owned
                    owned[row] = weight / len(share["keys"]) / world_size  # its share of the averaged loss
        assert sorted(owned) == list(range(len(full["keys"])))
        assert all(abs(w - 1 / len(full["keys"])) < 1e-6 for w in owned.values())  # float32 weights
        uneven += len({len(share["keys"]) for share in shares}) > 1 or len(full["keys"]) < world_size
    assert uneven, "no partial global batch: the test data should exercise uneven shares"


def _synthetic(shard_sizes: list[int], reg_every: int = 0) -> DatasetIndex:
    rng = random.Random(0)
    shards = []
    for s, n in enumerate(shard_sizes):
        samples = [
            (
                rng.choice([64, 96, 128]),
                rng.choice([64, 96]),
                rng.choice([1, 2, 5]),
                int(reg_every and i % reg_every == 0),
            )
            for i in range(n)
        ]
        shards.append(ShardIndex(f"shard-{s}.tar", samples))
    return DatasetIndex(shards)


@pytest.mark.parametrize("shard_sizes", [[40, 3, 17, 1, 9], [25], [2, 2], [60, 60, 60, 60, 60, 60, 60, 60, 60]])
@pytest.mark.parametrize(("world", "workers"), [(2, 2), (3, 1), (2, 0)])
def test_plan_ranks_equal_and_disjoint(shard_sizes, world, workers):
    """Uneven shards, fewer shards than ranks x workers: equal batches per rank, no sample on two slots."""
    index = _synthetic(shard_sizes, reg_every=4)
    choose = BucketSpec(**BUCKETS).chooser()
    plan = plan_epoch(index, choose, seed=1, epoch=0, world_size=world, workers=workers, batch_size=3, reg_ratio=1.0)
    per_rank = [sum(plan.quotas[r * plan.workers : (r + 1) * plan.workers]) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] > 0
    owner: dict[tuple[int, int], int] = {}
    for slot, units in enumerate(plan.units):
        for unit in units:
            for i in range(len(index.shards[unit.shard].samples)):
                if unit.takes(i):
                    assert (unit.shard, i) not in owner, "a sample is read by two slots"
                    owner[(unit.shard, i)] = slot
    assert len(owner) == index.num_samples
    # Short ranks split batches instead of dropping samples: every planned sample is seen.
    assert plan.dropped_samples == 0


def test_plan_with_more_slots_than_samples_still_gives_every_rank_batches():
    index = _synthetic([25], reg_every=4)
    plan = plan_epoch(index, BucketSpec(**BUCKETS).chooser(), seed=1, epoch=0, world_size=8, workers=4, batch_size=3)
    per_rank = {sum(plan.quotas[r * 4 : (r + 1) * 4]) for r in range(8)}
    assert per_rank == {plan.batches_per_rank} and plan.batches_per_rank > 0
    assert 0 < plan.dropped_samples < sum(map(sum, plan.copies)) / 2


def test_training_on_prepared_shards_sd1_and_sdxl(tiny_models, prepared, tmp_path):
    from lorafit.cli import main

    for family in ("sd1", "sdxl"):
        root = tmp_path / family
        main(
            [
                "fit",
                "--model.model",
                tiny_models[family],
                "--model.rank",
                "4",
                "--data.shards",
                str(prepared),
                "--data.resolution",
                "64",
                "--data.min_bucket_reso",
                "32",
                "--data.max_bucket_reso",
                "128",
                "--data.bucket_reso_steps",
                "32",
                "--data.batch_size",
                "2",
                "--trainer.max_steps",
                "3",
                "--trainer.accelerator",
                "cpu",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(root),
                "--export.name",
                "t",
            ]
        )
        assert (root / "lora" / "t.safetensors").is_file()


def test_without_buckets_any_resolution_works_whatever_the_bucket_range(demo_data, tmp_path):
    """enable_bucket false: square center crops at `resolution`; the (unused) bucket range of the
    defaults, 256 to 1024, must not refuse a 32 px run."""
    dm = LoraDataModule(train_dir=demo_data, resolution=32, enable_bucket=False, batch_size=2, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    batches = _epoch(dm)
    assert batches and all(tuple(b["pixel_values"].shape[1:]) == (3, 32, 32) for b in batches)


def test_bad_data_settings_name_their_key(prepared, tmp_path):
    with pytest.raises(LorafitError, match="exactly one of data.train_dir"):
        LoraDataModule()
    with pytest.raises(LorafitError, match="data.min_bucket_reso"):
        LoraDataModule(shards=str(prepared), resolution=64)
    with pytest.raises(LorafitError, match="data.batch_size"):
        LoraDataModule(shards=str(prepared), batch_size=0, **BUCKETS)
    with pytest.raises(LorafitError, match="does not exist"):
        load_index(str(tmp_path / "train-{000..002}.tar"), "data.shards")
    with pytest.raises(LorafitError, match="not a finished `lorafit prepare` output"):
        load_index(str(tmp_path), "data.shards")
