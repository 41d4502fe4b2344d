"""The samples of one shard in order, reading only the wanted ones' bytes where the source can seek.

A reader often needs a fraction of a shard: a rank's rows of the global batches, one interleaved
part of a shard split over readers, the batches after a resume point. webdataset's tar iterator
streams every member's bytes, so each of N readers would read the whole shard. A local tar is
read with ``tarfile`` in random-access mode instead: every member's 512-byte header is read and
the data of samples nobody asked for is seeked over. ``pipe:`` commands and URLs cannot seek; they
stream through webdataset and the unwanted samples are dropped after reading.

Members are grouped into samples the way webdataset's ``group_by_keys`` groups them (its own
``base_plus_ext`` key split, lower-cased suffixes, ``__...__`` metadata skipped), so sample ``i``
here is sample ``i`` of ``tarfile_samples`` and of the shard index.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator

from lorafit.data.shard_index import ShardIndex, is_local
from lorafit.errors import LorafitError

# webdataset's tar_file_iterator skips these member names (its `skip_meta` default and `__name__` files).
_META = re.compile(r"__[^/]*__($|/)")


def read_indexed(shard: ShardIndex, wanted: Callable[[int], bool]) -> Iterator[tuple[int, dict | None]]:
    """:func:`read_shard` over an indexed shard, checked against its index.

    A shard cut short (a copy interrupted, a full disk, a download stopped) or with damaged bytes
    either makes the tar reader raise or, as often, just ends early: both are named here with the
    shard and the last sample read, mid-epoch, instead of a tar traceback or a silently short epoch.
    """
    listed = len(shard.samples)
    count, key = 0, None
    try:
        for i, sample_key, sample in read_shard(shard.url, wanted):
            count, key = i + 1, sample_key  # the last sample read, for the message
            if i >= listed:
                break
            yield i, sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise LorafitError(_damaged(shard.url, count, listed, key, reason)) from None
    if count > listed:
        raise LorafitError(
            f"shard {shard.url} holds more samples than its index lists ({listed}); re-run `lorafit prepare` or "
            "delete the index cache (~/.cache/lorafit/index)"
        )
    if count < listed:
        raise LorafitError(_damaged(shard.url, count, listed, key, "it ends early"))


def _damaged(url: str, count: int, listed: int, key: str | None, reason: str) -> str:
    after = f"after sample {count} of {listed} (key {key})" if key else f"before the first of its {listed} samples"
    return (
        f"shard {url} is truncated or corrupt: reading stopped {after}: {reason}; re-run `lorafit prepare` "
        "(or `lorafit cache`) for it, or restore it from a good copy"
    )


def read_shard(url: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, str, dict | None]]:
    """``(i, key, sample)`` for every sample of the shard, in order; ``sample`` is None unless ``wanted(i)``.

    A sample is webdataset's dict: ``__key__``, ``__url__`` and one bytes entry per member suffix.
    """
    if not is_local(url):
        from webdataset.tariterators import tarfile_samples

        for i, sample in enumerate(tarfile_samples([{"url": url}])):
            yield i, sample["__key__"], sample if wanted(i) else None
        return
    yield from _read_local(url, wanted)


def _read_local(path: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, str, dict | None]]:
    from webdataset.tariterators import base_plus_ext

    i, key, sample = -1, None, None
    mode = "r:" if path.endswith(".tar") else "r:*"  # "r:*" first tries every compression on the header
    with open(path, "rb") as file, tarfile.open(fileobj=file, mode=mode) as tar:
        while (member := tar.next()) is not None:  # reads the header only, seeks over the data
            tar.members.clear()  # nothing looks members up by name; a long shard would pile them up
            name = member.name
            if not member.isreg() or _META.match(name) or _is_metadata_file(name):
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield i, key, sample
                i, key = i + 1, prefix
                sample = {"__key__": prefix, "__url__": path} if wanted(i) else None
            if sample is not None:
                suffix = suffix.lower()
                if suffix in sample:
                    raise ValueError(f"{name}: duplicate file name in tar file {path}")
                sample[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield i, key, sample


def _is_metadata_file(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")
