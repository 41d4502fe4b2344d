"""Reading a shard's samples selectively: the same samples as webdataset's reader, only the wanted bytes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import tarfile_samples

from lorafit.data import shard_reader
from lorafit.data.shard_index import ShardIndex
from lorafit.data.shard_reader import read_indexed, read_shard
from lorafit.errors import LorafitError

# Member names webdataset groups in its own way: folders in keys, several dots, upper-case
# suffixes, metadata files it skips, a sample of one member, a large member.
MEMBERS = [
    ("__index__", b"skip me"),
    ("a/one.JPG", b"1" * 700),
    ("a/one.txt", b"first"),
    ("two.seg.png", b"2" * 3000),
    ("two.json", b"{}"),
    ("__meta__/x.txt", b"skip me too"),
    ("three.txt", b"third"),
    ("four.jpg", b"4" * 20000),
    ("four.txt", b"fourth"),
]


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _webdataset(url: str) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in tarfile_samples([{"url": url}])]


def test_samples_are_webdatasets_and_only_the_wanted_ones_are_read(shard, monkeypatch):
    expected = _webdataset(str(shard))
    assert [s["__key__"] for s in expected] == ["a/one", "two", "three", "four"]
    read = {"bytes": 0}

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read["bytes"] += len(data)
            return data

        def readinto(self, buffer):
            n = super().readinto(buffer)
            read["bytes"] += n or 0
            return n

    monkeypatch.setattr(shard_reader, "open", lambda path, mode: Counting(path, "r"), raising=False)
    got = list(read_shard(str(shard), lambda i: i != 3))
    assert [(i, key) for i, key, _ in got] == [(i, s["__key__"]) for i, s in enumerate(expected)]
    assert [s for _, _, s in got[:3]] == expected[:3] and got[3][2] is None
    # The 20 kB member of the unwanted sample was seeked over: headers and the wanted bytes only.
    assert read["bytes"] < shard.stat().st_size - 19000


def test_streams_cannot_seek_and_still_give_the_same_samples(shard):
    url = f"pipe:cat {shard}"
    got = list(read_shard(url, lambda i: i % 2 == 0))
    expected = _webdataset(url)
    assert [s for _, _, s in got] == [expected[0], None, expected[2], None]


def _indexed(path: Path, listed: int) -> ShardIndex:
    return ShardIndex(str(path), [(64, 64, 1, 0)] * listed)


def test_a_shard_that_does_not_match_its_index_is_named(shard):
    assert len(list(read_indexed(_indexed(shard, 4), lambda i: True))) == 4
    with pytest.raises(LorafitError, match=r"odd.tar holds more samples than its index lists \(3\)"):
        list(read_indexed(_indexed(shard, 3), lambda i: True))
    with pytest.raises(LorafitError, match=r"odd.tar is truncated or corrupt: .*after sample 4 of 5 .*ends early"):
        list(read_indexed(_indexed(shard, 5), lambda i: True))


@pytest.mark.parametrize("wanted", [True, False])
def test_a_truncated_shard_is_named_with_the_last_sample_read(shard, tmp_path, wanted):
    """Cut inside the last sample's 20 kB image: read for the sample, or seeked over for another reader."""
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size - 12000])
    with pytest.raises(LorafitError) as err:
        list(read_indexed(_indexed(cut, 4), lambda i: wanted))
    message = str(err.value)
    assert message.startswith(f"shard {cut} is truncated or corrupt: reading stopped after sample 3 of 4 (key three)")
    assert "re-run `lorafit prepare`" in message and "\n" not in message
