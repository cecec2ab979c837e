"""Read what W&B wrote in offline mode: the records of `<dir>/wandb/offline-run-*/run-<id>.wandb`.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-log records (4-byte
CRC, 2-byte little-endian length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last piece) in 32 KiB blocks,
each record one `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32 * 1024, 7


@dataclass
class OfflineRun:
    run_id: str
    project: str
    group: str
    name: str
    job_type: str
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        piece, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        pieces = piece if kind in (1, 2) else pieces + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def read_offline_run(path: Path) -> OfflineRun | None:
    """The run in one file, or None while its run record is not written yet."""
    run: OfflineRun | None = None
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(
                r.run_id,
                r.project,
                r.run_group,
                r.display_name,
                r.job_type,
                {i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"},
            )
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def offline_runs(root: Path, timeout: float = 60.0) -> list[OfflineRun]:
    """Every offline run under root (its `wandb/` dirs), oldest first, once each is whole: W&B's service
    process writes the file behind the run, so a finished run's last records may land a moment later."""
    paths = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        runs = [read_offline_run(p) for p in paths]
        if all(r is not None and r.exit_code is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)
