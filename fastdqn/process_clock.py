"""How long this process has been running, from the OS's record of when it started.

A run reports its time to the first gradient update from process start, so the figure includes what a user
waits for before training begins: interpreter start, imports, env creation, warm-up steps and compiling.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/self/stat")


def seconds_since_start() -> float | None:
    """Seconds since this process was started (forked), to the OS clock tick (10 ms on Linux); None where the
    OS does not say (no /proc)."""
    try:
        fields = STAT.read_text().rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    except OSError:
        return None
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time after boot
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started
