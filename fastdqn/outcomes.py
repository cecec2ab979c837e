"""What a run of an experiment leaves: `result.json` when it finished (or was pruned), and the summary that the
reports and the search read back from it and from its `metrics.jsonl`."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdqn.plans import RESULT_FILE


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """Mark the run finished (or pruned), atomically: a kill while writing leaves no result.json."""
    tmp = run_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run_dir / RESULT_FILE)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class RunSummary:
    final_return: float  # the last evaluation's mean return (a pruned run's last one before it stopped)
    best_return: float  # the best evaluation's mean return: the score of the run's best.pt
    auc: float  # mean greedy return over all evaluations: how early and how well it learned
    steps_to_solve: float  # inf when never solved
    episodes_to_solve: float
    wall_time: float
    evals: list[tuple[int, float]]
    train: list[tuple[int, float]]
    pruned: bool = False  # a search stopped it early; its numbers cover only the steps it ran


def read_run(run_dir: Path, solve_line: float | None) -> RunSummary | None:
    """Summary of a finished run from its metrics.jsonl and result.json; None if it has not finished."""
    result = read_result(run_dir)
    if result is None:
        return None
    evals, train, solved = [], [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            evals.append((rec["step"], rec["mean"]))
            if solved is None and solve_line is not None and rec["mean"] >= solve_line:
                solved = (rec["step"], rec.get("episodes", math.inf))
        elif rec["kind"] == "train" and rec.get("recent_return") is not None:
            train.append((rec["step"], rec["recent_return"]))
    return RunSummary(
        evals[-1][1],
        max(m for _, m in evals),
        statistics.fmean(m for _, m in evals),
        solved[0] if solved else math.inf,
        solved[1] if solved else math.inf,
        result["wall_time"],
        evals,
        train,
        bool(result.get("pruned")),
    )
