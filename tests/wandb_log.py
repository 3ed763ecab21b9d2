"""A wandb offline run read back from the file wandb itself wrote, for the tests.

An offline run keeps everything in `wandb/offline-run-*/run-<id>.wandb`: wandb's protobuf
Records in a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of records, each a
7-byte header: CRC, length, type; a record too long for its block continues in the next).
`wandb sync` uploads exactly these records, so replaying them gives what `wandb.Api().runs()`
shows once synced: the run's name, group, tags, config and summary, and its history rows.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

FILE_HEADER = b":W&B\xe1\xbe\x00"  # ident ":W&B", magic 0xBEE1 (little-endian), version 0
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:len(FILE_HEADER)] != FILE_HEADER:
        raise ValueError(f"{path}: not a wandb record file (header {data[:7]!r})")
    pos, chunks = len(FILE_HEADER), b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


@dataclass
class StoredRun:
    """What wandb.Api().runs() yields for a run, as far as scripts/report.py reads it."""
    name: str
    group: str
    tags: list[str]
    state: str
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_offline_run(run_dir: Path) -> StoredRun:
    """The one offline run under run_dir/wandb, replayed."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    run = StoredRun(name="", group="", tags=[], state="running")
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.tags = r.display_name, r.run_group, list(r.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            for i in record.config.remove:
                run.config.pop(_key(i), None)
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json)
                                for i in record.summary.update})
            for i in record.summary.remove:
                run.summary.pop(_key(i), None)
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            run.state = "finished" if record.exit.exit_code == 0 else "failed"
    return run
