"""What a run dir holds and how it is named: the resolved `config.yaml`, and which config a resume continues.

A run dir (`runs/<env>-s<seed>-<time>/` unless named) holds `config.yaml`, TensorBoard events, `metrics.jsonl`
and the checkpoints `ckpt-<env_step>.pt` (see `checkpoint.py`). While a process trains in it, it also holds a
locked `.lock` naming that process, so a second trainer (a forgotten run, a retried cluster task) cannot write
into the same dir.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from fastdqn.checkpoint import check_run_owns, latest_checkpoint, list_checkpoints, read_checkpoint_config
from fastdqn.config import FIELDS, Config, load_yaml
from fastdqn.disk import run_write
from fastdqn.errors import RunDirLocked

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"


def default_run_dir(cfg: Config, root: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.env_id).strip("-")
    return Path(root) / f"{slug}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_config(cfg: Config, run_dir: Path) -> None:
    """The run's resolved config.yaml, replaced atomically: a kill while writing leaves the previous one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    try:
        with run_write(run_dir / CONFIG_FILE, "the run's config", len(text.encode())):
            tmp.write_text(text)
            os.replace(tmp, run_dir / CONFIG_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def resume_point(run_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(newest checkpoint, its config) of a run to resume; (None, config.yaml) for a run stopped before its
    first checkpoint, which then trains again from env step 0 with nothing lost."""
    run_dir = Path(run_dir)
    has_config = (run_dir / CONFIG_FILE).is_file()
    if has_config and not list_checkpoints(run_dir):
        return None, _known_keys(load_yaml(run_dir / CONFIG_FILE))
    newest = latest_checkpoint(run_dir)  # a clear error when the dir or its checkpoints are missing
    saved = read_checkpoint_config(newest)
    if has_config:
        check_run_owns(newest, saved, load_yaml(run_dir / CONFIG_FILE))
    return newest, saved


def _known_keys(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k in FIELDS}


class RunDirLock:
    """An exclusive OS lock (flock) on `run_dir/.lock` while a process trains there.

    The kernel drops the lock when its process exits, however it exits (SIGKILL included), so a killed run never
    leaves a stale lock behind. Readers (`fastdqn eval`, `fastdqn report`) do not take it. The file keeps the
    holder's pid and host so that the refusal can name them.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise RunDirLocked(
                f"run dir '{self.run_dir}' is in use by another fastdqn process (pid {pid} on host "
                f"{host}): let it finish or stop it first (a stopped run resumes with --resume), or "
                "train into another --run-dir"
            ) from None
        mine = f"{os.getpid()} {socket.gethostname()}\n".encode()
        try:
            with run_write(self.path, "the run-dir lock", len(mine)):
                os.ftruncate(fd, 0)
                os.write(fd, mine)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
