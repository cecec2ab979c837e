"""Where an experiment's runs train: the local backend (this machine), or Ray (`fastdqn.ray_backend`).

A backend takes runs (`RunJob`s), says how many it can train at once, hands back each run's result as it
ends, and on Ctrl-C stops its runs so that each saves a checkpoint (a later `--resume` continues them).
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

from fastdqn.errors import ConfigError
from fastdqn.jobs import RunJob, train_job


@dataclass(frozen=True)
class BackendSpec:
    """The --backend flags: local (`workers` processes) or ray (a cluster at `address`, resources per run)."""

    kind: str = "local"
    workers: int | None = None  # local: 2 by default; ray: as many as the cluster's resources hold
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0


class Backend(Protocol):
    def describe(self) -> str:
        """Where and how many at a time, for the experiment's first line."""

    def start(self, out: Path) -> None:
        """Get ready to train runs under `out`, which now holds the experiment's plan."""

    def capacity(self) -> int:
        """How many runs it can train at once now."""

    def running(self) -> int:
        """Runs submitted and not yet handed back."""

    def submit(self, job: RunJob) -> None: ...

    def wait(self) -> list[tuple[RunJob, dict[str, Any]]]:
        """Block until at least one run ends; each ended run with its result."""

    def stop(self) -> None:
        """Start nothing more; stop the running runs (each saves a checkpoint) and wait until they have."""

    def close(self) -> None: ...


def _local_job(job: RunJob, threads: int, stop_file: str) -> dict[str, Any]:
    """A run in a pool process; none starts once the experiment is being stopped (`stop_file` exists)."""
    if Path(stop_file).exists():
        return {"run_dir": job.run_dir, "error": "not started: the experiment was interrupted"}
    return train_job(job, threads)


class LocalBackend:
    """Runs on this machine: one after another in this process (workers=1, no start-up cost) or in `workers`
    spawned processes, each with an equal share of the CPU threads."""

    def __init__(self, workers: int, out: Path):
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, max(1, (os.cpu_count() or 1) // workers)
        self.stop_file = Path(out) / ".stopping"
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
        self.queued: list[RunJob] = []  # in-process: submitted, trained in wait()
        self.futures: dict[Future, RunJob] = {}

    def start(self, out: Path) -> None:
        self.stop_file.unlink(missing_ok=True)  # left by an earlier Ctrl-C

    def describe(self) -> str:
        return f"{self.workers} at a time on this machine" + (" (in this process)" if self.pool is None else "")

    def capacity(self) -> int:
        return self.workers

    def running(self) -> int:
        return len(self.futures) + len(self.queued)

    def submit(self, job: RunJob) -> None:
        if self.pool is None:
            self.queued.append(job)
        else:
            self.futures[self.pool.submit(_local_job, job, self.threads, str(self.stop_file))] = job

    def wait(self) -> list[tuple[RunJob, dict[str, Any]]]:
        if self.pool is None:
            job = self.queued.pop(0)
            result = train_job(job, self.threads)
            if result.get("interrupted") and not result.get("pruned"):
                raise KeyboardInterrupt  # Ctrl-C reached the run in this process: it saved, now stop the rest
            return [(job, result)]
        done, _ = wait(self.futures, return_when=FIRST_COMPLETED)
        return [(self.futures.pop(future), future.result()) for future in done]

    def stop(self) -> None:
        # Start no queued run; a running one gets SIGTERM, which makes its Trainer save a checkpoint and stop.
        self.queued.clear()
        if self.pool is not None:
            self.stop_file.touch()
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
