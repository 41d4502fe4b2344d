"""Read the records of an offline W&B run file (``run-<id>.wandb``) without a W&B server.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
LevelDB-log-style 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full, first, middle,
last) carrying protobuf ``Record`` messages. wandb ships no reader for it any more (its Go core
writes it), so this test helper reads it directly.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32, length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: str | Path) -> list:
    """Every ``wandb_internal_pb2.Record`` in ``path``, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    records, pending, offset = [], b"", 7
    while offset + HEADER.size <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER.size:  # block trailer padding
            offset += room
            continue
        _, length, kind = HEADER.unpack_from(data, offset)
        chunk = data[offset + HEADER.size : offset + HEADER.size + length]
        offset += HEADER.size + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_records(run_dir: Path) -> dict[str, list]:
    """Records of the offline run in ``run_dir`` grouped by type: ``config`` updates and ``history`` rows.

    Returns ``{"config": {key: json}, "history": [{key: json}, ...]}``.
    """
    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    config, history = {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        # The config arrives in the run record when set before the run started, else as updates.
        if kind == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return {"config": config, "history": history}
