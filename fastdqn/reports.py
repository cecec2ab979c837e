"""An experiment's reports, built only from what is on disk (so `fastdqn report DIR` rebuilds them any time):
`results.md` (the table and how to read it), `curves.png` for an ablation, `results.csv` and `best.yaml` for a
sweep, and for a searched sweep the trials' status and Optuna's parameter importances."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from fastdqn import config as C
from fastdqn.outcomes import RunSummary, read_run
from fastdqn.plans import METRICS, Plan, Point, load_plan, run_dir_of

TABLE_FILE, CSV_FILE, PLOT_FILE, BEST_FILE = "results.md", "results.csv", "curves.png", "best.yaml"


@dataclass
class PointSummary:
    point: Point
    runs: list[RunSummary]
    seeds: int
    state: str | None = None  # a searched sweep's trial: complete, pruned, fail or running

    def values(self, metric: str) -> list[float]:
        return [getattr(r, metric) for r in self.runs]

    def median(self, metric: str) -> float:
        return statistics.median(self.values(metric)) if self.runs else math.nan

    @property
    def solved(self) -> int:
        return sum(math.isfinite(r.steps_to_solve) for r in self.runs)

    @property
    def ranked(self) -> int:
        """0: finished; 1: pruned (its numbers cover the steps it ran); 2: no result yet."""
        if not self.runs:
            return 2
        return 1 if any(r.pruned for r in self.runs) else 0


def points_of(plan: Plan, out: Path) -> list[tuple[Point, str | None]]:
    """The experiment's points: the plan's, or a searched sweep's trials with their state."""
    if plan.search is None:
        return [(p, None) for p in plan.points]
    from fastdqn.search import study_points

    return list(study_points(plan, out))


def summarize(plan: Plan, out: Path) -> list[PointSummary]:
    summaries = []
    for point, state in points_of(plan, out):
        runs = [read_run(run_dir_of(out, point, s), plan.solve_line) for s in plan.seeds]
        summaries.append(PointSummary(point, [r for r in runs if r is not None], len(plan.seeds), state))
    return summaries


# --- tables ------------------------------------------------------------------------------------------------
def _count(x: float) -> str:
    return "never" if not math.isfinite(x) else f"{x:,.0f}"


def _median_range(values: list[float]) -> str:
    """Median (min-max) over seeds; a seed that never solved counts as infinitely late ("never")."""
    if not values or not any(math.isfinite(v) for v in values):
        return "never" if values else "-"
    return f"{_count(statistics.median(values))} ({_count(min(values))}-{_count(max(values))})"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.fmean(values):.1f} +- {statistics.pstdev(values):.1f}"


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _status(s: PointSummary) -> str:
    if s.ranked == 1:
        return f"pruned at {s.runs[0].evals[-1][0]:,}"
    return {"complete": "done", "fail": "failed", "running": "running or stopped"}.get(s.state or "", s.state or "-")


def solved_definition(plan: Plan) -> str:
    b, line = plan.base, plan.solve_line
    evals = (
        f"greedy evaluation ({b['eval_episodes']} episodes, every {b['eval_every']:,} env steps and at the end of "
        f"{b['total_steps']:,})"
    )
    rest = (
        "Final greedy return: mean +- std over seeds of each run's last evaluation; best greedy return: of each "
        "run's best evaluation (the policy its best.pt keeps). Wall time: mean per run (the runs of a population, "
        "trained together, each count its whole wall time)."
    )
    if line is None:
        return f"{b['env_id']} has no solve line: scores only. Each {evals} is the mean return. {rest}"
    return (
        f"Solved: a {evals} with mean return >= {line:g}. Episodes to solve: training episodes finished by that "
        f"evaluation, median (min-max) over seeds. {rest}"
    )


def search_note(plan: Plan, summaries: list[PointSummary]) -> str:
    search = plan.search
    assert search is not None
    pruned = sum(s.ranked == 1 for s in summaries)
    pruner = {"median": "the median pruner", "halving": "successive halving", "none": "no pruner"}[search.pruner]
    return (
        f" Points picked by Optuna's {search.sampler} sampler (seed {search.seed}, {search.startup_trials} "
        f"random start-up trials), {len(summaries)} of {search.trials} trials so far, one run each (seed "
        f"{plan.seeds[0]}); {pruner} stopped {pruned}: a pruned run's numbers cover only the env steps it "
        f"ran, and it ranks below the finished ones."
    )


def table_rows(plan: Plan, summaries: list[PointSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ablation table, or of the sweep table sorted by the plan's metric."""
    search = plan.search
    has_line = plan.solve_line is not None
    solve_cols = ["solved", "episodes to solve", "env steps to solve"] if has_line else ["runs"]
    if plan.kind == "ablate":
        header = ["variant", *solve_cols, "final greedy return", "best greedy return", "wall time (s)"]
        ordered = summaries
    else:
        keys = list(search.space) if search else list(dict.fromkeys(k for p in plan.points for k in p.changes))
        header = [
            "rank",
            *(["trial"] if search else []),
            *keys,
            *(["status"] if search else []),
            *solve_cols,
            "final greedy return",
            "mean eval return",
            "wall time (s)",
        ]
        ordered = sorted(summaries, key=lambda s: _sort_key(s, plan.metric))
    rows = []
    for rank, s in enumerate(ordered, 1):
        done = f" ({len(s.runs)} of {s.seeds} runs done)" if len(s.runs) < s.seeds else ""
        if has_line:
            cells = [
                f"{s.solved}/{len(s.runs)}{done}",
                _median_range(s.values("episodes_to_solve")),
                _median_range(s.values("steps_to_solve")),
            ]
        else:
            cells = [f"{len(s.runs)}{done}"]
        cells += [_mean_std(s.values("final_return")), _mean_std(s.values("best_return"))]
        if plan.kind == "ablate":
            rows.append([s.point.name, *cells, _wall(s)])
        else:
            trial = [s.point.name.removeprefix("trial ")] if search else []
            status = [_status(s)] if search else []
            rows.append(
                [
                    str(rank),
                    *trial,
                    *(_value(s.point.changes.get(k)) for k in keys),
                    *status,
                    *cells,
                    _mean_std(s.values("auc")),
                    _wall(s),
                ]
            )
    return header, rows


def _wall(s: PointSummary) -> str:
    return f"{statistics.fmean(s.values('wall_time')):.1f}" if s.runs else "-"


def _sort_key(s: PointSummary, metric: str) -> tuple[int, float, float]:
    """Finished first, then pruned, then the rest; within them best first: the metric's median (sign-flipped
    where higher is better), then the mean eval return."""
    if not s.runs:
        return (s.ranked, math.inf, math.inf)
    higher_better = METRICS[metric][1]
    value = s.median(metric)
    return (s.ranked, -value if higher_better else value, -s.median("auc"))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, header: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


def importance_markdown(plan: Plan, out: Path) -> str:
    """Optuna's parameter-importance table of a searched sweep, once enough trials finished."""
    from fastdqn.search import IMPORTANCE_MIN_TRIALS, importances

    values, finished = importances(plan, out)
    if not values:
        return (
            f"Parameter importance: after {IMPORTANCE_MIN_TRIALS} finished trials with different points "
            f"({finished} so far)."
        )
    rows = [[key, f"{value:.3f}"] for key, value in values.items()]
    return (
        f"Parameter importance (Optuna's default evaluator over {finished} finished trials; the shares sum "
        f"to 1):\n\n{markdown_table(['parameter', 'importance'], rows)}"
    )


# --- plot --------------------------------------------------------------------------------------------------
def plot_curves(plan: Plan, summaries: list[PointSummary], path: Path) -> None:
    """Greedy eval return and training return against env steps: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, attr, title in (
        (axes[0], "evals", "greedy evaluation return"),
        (axes[1], "train", "training return (mean of last 20 episodes)"),
    ):
        for s in summaries:
            runs = [getattr(r, attr) for r in s.runs if getattr(r, attr)]
            if not runs:
                continue
            grid = np.linspace(max(run[0][0] for run in runs), min(run[-1][0] for run in runs), 101)
            curves = [np.interp(grid, [step for step, _ in run], [value for _, value in run]) for run in runs]
            stack = np.array(curves)
            (line,) = ax.plot(grid, stack.mean(0), label=f"{s.point.name} ({len(curves)} seeds)")
            ax.fill_between(grid, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.15)
        if plan.solve_line is not None:
            ax.axhline(plan.solve_line, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("return")
    if axes[0].lines:
        axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{plan.base['env_id']}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- reports -----------------------------------------------------------------------------------------------
def best_point(plan: Plan, summaries: list[PointSummary]) -> PointSummary | None:
    """The best point that finished (a pruned one never is)."""
    finished = [s for s in summaries if s.ranked == 0]
    return min(finished, key=lambda s: _sort_key(s, plan.metric)) if finished else None


class Report(NamedTuple):
    markdown: str  # the table and the note, as written to results.md
    table: Any  # the same table for the console (rich)
    note: str  # how to read it: what "solved" means, what is sorted (and a search's parameter importances)


def report(out: Path) -> Report:
    """Rebuild an experiment's table (Markdown + rich), plot (ablate) or CSV and best.yaml (sweep) from disk."""
    out = Path(out)
    plan = load_plan(out)
    summaries = summarize(plan, out)
    header, rows = table_rows(plan, summaries)
    title = f"fastdqn {plan.kind}: {plan.base['env_id']}, {len(plan.seeds)} seeds"
    note = solved_definition(plan)
    if plan.kind == "sweep":
        note += f" Sorted by {METRICS[plan.metric][0]} (median over seeds)."
    if plan.search is not None:
        note += search_note(plan, summaries) + "\n\n" + importance_markdown(plan, out)
    markdown = f"{markdown_table(header, rows)}\n\n{note}\n"
    (out / TABLE_FILE).write_text(markdown)
    if plan.kind == "ablate":
        plot_curves(plan, summaries, out / PLOT_FILE)
    else:
        with (out / CSV_FILE).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        best = best_point(plan, summaries)
        if best is not None:
            cfg = C.from_dict({**plan.base, **best.point.changes})
            (out / BEST_FILE).write_text(
                f"# best point of the sweep in {out} by {plan.metric}; "
                f"use with: fastdqn train --config {out / BEST_FILE}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            )
    return Report(markdown, rich_table(title, header, rows), note)
