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
    """:func:`read_shard` over an indexed shard, which must hold exactly the samples its index lists."""
    count = 0
    for i, sample in read_shard(shard.url, wanted):
        count = i + 1
        if i >= len(shard.samples):
            break
        yield i, sample
    if count != len(shard.samples):
        raise LorafitError(
            f"shard {shard.url} does not match its index ({len(shard.samples)} samples listed, "
            f"{'more' if count > len(shard.samples) else count} found); re-run `lorafit prepare` or "
            "delete the index cache (~/.cache/lorafit/index)"
        )


def read_shard(url: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, dict | None]]:
    """``(i, sample)`` for every sample of the shard, in order; ``sample`` is None unless ``wanted(i)``.

    A sample is webdataset's dict: ``__key__``, ``__url__`` and one bytes entry per member suffix.
    """
    if not is_local(url):
        from webdataset.tariterators import tarfile_samples

        for i, sample in enumerate(tarfile_samples([{"url": url}])):
            yield i, sample if wanted(i) else None
        return
    yield from _read_local(url, wanted)


def _read_local(path: str, wanted: Callable[[int], bool]) -> Iterator[tuple[int, dict | None]]:
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
                    yield i, sample
                i, key = i + 1, prefix
                sample = {"__key__": prefix, "__url__": path} if wanted(i) else None
            if sample is not None:
                suffix = suffix.lower()
                if suffix in sample:
                    raise ValueError(f"{name}: duplicate file name in tar file {path}")
                sample[suffix] = tar.extractfile(member).read()
    if key is not None:
        yield i, sample


def _is_metadata_file(name: str) -> bool:
    return "/" not in name and name.startswith("__") and name.endswith("__")
