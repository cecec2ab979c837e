"""A small real filesystem (tmpfs) to fill up: how the disk-full tests and benchmarks/chaos.py run out of space.

Mounting needs root (CI runs as root); without it the caller fails loudly rather than skipping.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 * 1024


@contextlib.contextmanager
def tmpfs(point: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` KiB mounted at `point` for the block, unmounted after it (lazily, if still busy)."""
    point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        raise RuntimeError(
            f"cannot mount a tmpfs at {point} ({mounted.stderr.strip()}): the disk-full checks need root, as CI has"
        )
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def resize(point: Path, size_kib: int) -> None:
    """Grow or shrink a mounted tmpfs (what "free space" is for a test)."""
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(point)], check=True, capture_output=True)


def fill(point: Path, leave: int = 0, name: str = "filler") -> Path:
    """Write a file that takes all the free space of the filesystem at `point` but about `leave` bytes."""
    filler = point / name
    with filler.open("ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * CHUNK)
            except OSError:
                break
        while True:  # the last partial chunk
            try:
                if f.write(b"\0" * 512) == 0:
                    break
            except OSError:
                break
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
