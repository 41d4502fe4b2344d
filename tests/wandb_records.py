"""Read the records of an offline W&B run (``run-<id>.wandb``), for tests.

wandb >= 0.19 ships no Python reader for its run files (the service that writes them is in Go),
so this reads the framing directly: a 7-byte ``:W&B`` header, then LevelDB-log style chunks in
32 KiB blocks (7-byte chunk header: CRC32, length, type FULL/FIRST/MIDDLE/LAST), each record a
``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: too short for a header, zero-padded
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def run_records(run_dir: Path) -> dict[str, list]:
    """Records of the offline run in ``run_dir`` grouped by type: ``config`` updates and ``history`` rows.

    Returns ``{"config": {key: json}, "history": [{key: json}, ...]}``.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    config, history = {}, []
    for raw in _chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        # The config arrives in the run record when set before the run started, else as updates.
        if kind == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return {"config": config, "history": history}
