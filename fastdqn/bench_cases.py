"""The records `fastdqn bench` keeps: timed cases with all their samples, and speed-ups over a baseline.

No torch here: the command's option parsing, the training suites (which run each case in its own process) and
the in-process suites all share these records, and `fastdqn bench --help` stays fast.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# Config changes of each update-step variant of the update suites, as the update runner reads them.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"cuda_graph": "never"},
    "eager-autograd": {"cuda_graph": "never"},  # the eager step with autograd's gradients (update-mlp only)
    "compiled": {"compile": True, "cuda_graph": "never"},
    "compiled+amp": {"compile": True, "amp": True, "cuda_graph": "never"},
    "cuda-graph": {"compile": True, "amp": True, "cuda_graph": "always"},
}
# Config changes of the training suites' variants: the flags a user adds (on CUDA, compile brings the CUDA graph).
TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "compiled": {"compile": True},
    "compiled+amp": {"compile": True, "amp": True},
}


@dataclass
class Case:
    """One case of an in-process suite: `samples` are seconds per `unit`, one per round."""

    suite: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str = ""
    speedup: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def with_speedups(cases: list[Case], baseline: str) -> list[Case]:
    """Speed-up of each case over the one named `baseline` (ratio of medians from the same run)."""
    base = next(c for c in cases if c.name == baseline)
    for case in cases:
        case.baseline, case.speedup = baseline, base.median / case.median
    return cases


# What each training run records (see fastdqn.bench_training for how each is measured).
RUN_FIELDS = {
    "whole_s": "wall-clock seconds from starting the process to its exit: what a user waits",
    "cpu_s": "CPU seconds (user + system) of the process and its children",
    "first_update_s": "seconds from process start to the end of the first gradient update: interpreter, imports, "
    "env start, warm-up steps, compile",
    "steady_sps": "env steps per second from the end of the first update to the end of training (no final "
    "evaluation, no set-up)",
    "reported_sps": "env steps per second as the run itself reports it: env steps over its training loop, "
    "warm-up steps included",
}


@dataclass
class TrainingCase:
    """One training case: every run of it is a new process; `runs` holds one dict of RUN_FIELDS per run."""

    suite: str
    name: str
    command: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)
    baseline: str = ""

    def median(self, key: str) -> float:
        return statistics.median(run[key] for run in self.runs)

    def spread(self, key: str) -> tuple[float, float]:
        values = [run[key] for run in self.runs]
        return min(values), max(values)
