"""Read an offline wandb run file (`run-<id>.wandb`) back: the run record (id, group, tags,
config) and the history rows. Used by the tests, and handy to check what a run mirrored
before `make sync`.

The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) of protobuf `Record`s
behind a 7-byte W&B header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def read_run(path) -> dict:
    """{'id', 'name', 'group', 'tags', 'config', 'history': [row dicts], 'finished'} of one run
    file (`finished`: its exit record is written; wandb's service writes the file asynchronously)."""
    out = dict(id=None, name=None, group=None, tags=[], config={}, history=[], finished=False)
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group, tags=list(rec.run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update
                                  if not i.key.startswith("_")})
        elif kind == "exit":
            out["finished"] = True
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
    return out


def read_finished_run(path, timeout_s: float = 60.0) -> dict:
    """`read_run`, waiting until wandb's service has written the exit record."""
    import time

    deadline = time.time() + timeout_s
    while True:
        run = read_run(path)
        if run["finished"] or time.time() > deadline:
            return run
        time.sleep(0.2)


def find_run_files(run_dir) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
