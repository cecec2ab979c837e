"""Writes into a run dir and the disk space they need.

Every file a run writes (checkpoints, config.yaml, metrics.jsonl, TensorBoard events, profiler traces, eval.json,
videos) is written inside `run_write`, which turns a failure for lack of space or quota into one `DiskFull` line
naming the path, what the write needed and what is free, wherever the OSError surfaces: torch.save wraps it in a
RuntimeError, TensorBoard's writer thread raises it on a later call, so the whole exception chain is searched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastdqn.errors import DiskFull, format_bytes, space_error


def existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where a file about to be written will live)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path`."""
    return shutil.disk_usage(existing(path)).free


def need_text(need: int | None, path: Path) -> str:
    """What a write needs, in words: its size, or (unknown size) one more block of the filesystem."""
    if need is not None:
        return format_bytes(need)
    try:
        block = os.statvfs(existing(path)).f_bsize
    except OSError:
        return "more space"
    return f"at least one more {format_bytes(block)} block"


FULL_BELOW = 1024 * 1024  # a filesystem with less free is full for a writer that does not say why it failed


@contextlib.contextmanager
def run_write(path: Path, what: str, need: int | None = None, opaque: bool = False) -> Iterator[None]:
    """Run the block that writes `path` (`what` it is, `need` bytes if known); a failure for lack of space or quota
    anywhere in it becomes DiskFull, chained to the original error (shown with --debug).

    `opaque`: the writer does not say why it failed (OpenCV, the profiler's C++ exporter), so any failure while the
    filesystem has less than FULL_BELOW free is taken for a full disk.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        space = space_error(exc)
        if space is None and opaque and free_bytes(Path(path)) < FULL_BELOW:
            space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if space is None:
            raise
        raise DiskFull(
            path,
            what,
            need_text(need, Path(path)),
            format_bytes(free_bytes(Path(path))),
            quota=space.errno == errno.EDQUOT,
        ) from exc


def check_space(path: Path, what: str, need: int) -> None:
    """DiskFull, before anything is written, if `need` bytes exceed the free space where `path` goes."""
    free = free_bytes(Path(path))
    if need > free:
        raise DiskFull(path, what, format_bytes(need), format_bytes(free))


def is_partial_view(value: Any) -> bool:
    """Is `value` a tensor that covers only part of its storage (a slice of a population's stacked tensors)?"""
    import torch

    return isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size()


def storage_sizes(obj: Any) -> list[int]:
    """Bytes of each tensor storage in a nested container (each storage once: what torch.save writes), a tensor
    that views part of a larger storage counted as the copy of its part that a checkpoint writes (own_storages)."""
    import torch

    storages: dict[tuple[str, int], int] = {}

    def walk(value: Any) -> None:
        if is_partial_view(value):
            storages[("view", id(value))] = value.numel() * value.element_size()
        elif isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(str(value.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(obj)
    return list(storages.values())


@contextlib.contextmanager
def quiet_space_errors_in_threads() -> Iterator[None]:
    """While the block runs, a thread that dies of a space error prints no traceback: TensorBoard's writer thread
    stores its error and its owner re-raises it on the next call, which reports it in one line."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or space_error(args.exc_value) is None:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
