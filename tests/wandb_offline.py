"""Reading an offline W&B run file (``run-<id>.wandb``) in tests: wandb 0.31 ships no reader.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by 32 KiB blocks of records in the
LevelDB log layout (a 7-byte header per chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST; a block tail
shorter than a header is zero padding). Each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding, or the unwritten end of a killed run's file
            pos += left_in_block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: str | Path) -> list[dict]:
    """The rows given to ``run.log``, as dicts of decoded values."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({".".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_id(path: str | Path) -> str:
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError(f"no run record in {path}")
