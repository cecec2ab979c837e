"""How much memory a device has free, and the start-up check that a replay buffer fits in it."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdqn.errors import ConfigError, format_bytes

HEADROOM = 0.9  # a buffer may take at most this share of the free memory; the rest is for networks and batches


def free_bytes(device: torch.device) -> int:
    """Memory a new buffer on `device` can take: on CUDA the driver's free memory plus the blocks PyTorch's caching
    allocator holds unused (a second run in one process finds the first one's memory cached there, which the
    driver counts as used); on the host MemAvailable, else free pages."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_replay_fits(nbytes: int, capacity: int, device: torch.device) -> str:
    """Raise ConfigError, with the numbers, if a replay of `nbytes` does not fit the device's free memory.

    Returns the one-line report printed at start-up.
    """
    free = free_bytes(device)
    per = nbytes / capacity
    if nbytes > HEADROOM * free:
        most = int(HEADROOM * free / per)
        raise ConfigError(
            f"replay buffer of {capacity:,} transitions needs {format_bytes(nbytes)} on {device} "
            f"({per:,.0f} B per transition) but only {format_bytes(free)} is free: lower buffer_size "
            f"to at most {most:,} or use a device with more memory"
        )
    return (
        f"replay: {capacity:,} transitions x {per:,.0f} B = {format_bytes(nbytes)} on {device} "
        f"({format_bytes(free)} free)"
    )
