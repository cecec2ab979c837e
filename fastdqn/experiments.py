"""Ablations and sweeps: many real `fastdqn train` runs in worker processes, and the reports built from them.

An experiment dir holds `plan.json` (the base config, the points to run and the seeds) and, for each point and
seed, `<point>/seed-<s>.yaml` (the run's full config) and the run dir `<point>/seed-<s>/` written by
`fastdqn.train` (the call behind `fastdqn train`, so a run here is exactly a `fastdqn train` run).
A run whose dir holds `result.json` is finished and never run again; a stopped one resumes from its newest
checkpoint. Reports are built only from what is on disk, so `fastdqn report DIR` rebuilds them at any time.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import random
import re
import signal
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from fastdqn import config as C
from fastdqn.errors import ConfigError

PLAN_FILE, RESULT_FILE, TABLE_FILE, CSV_FILE, PLOT_FILE, BEST_FILE = (
    "plan.json", "result.json", "results.md", "results.csv", "curves.png", "best.yaml")

# Each variant changes "full DQN": the config with Double DQN and every extension off.
CLASSIC = {"double_dqn": False, "dueling": False, "n_step": 1, "prioritized": False, "replay_buffer": True}
TABLE = ["full", "no-target", "no-replay", "small-buffer", "no-decay", "mse", "double"]  # the lecture's rows


def ablation_variants(base: C.Config) -> dict[str, tuple[str, dict[str, Any]]]:
    """Variant id -> (row name, config changes relative to full DQN): the lecture's rows, then extensions."""
    n = base.num_envs
    return {
        "full": ("full DQN", {}),
        "no-target": ("no target network", {"target_update": "none"}),  # TD targets from the online net
        # A buffer of one vector step: each transition trains exactly one update, in the order it came.
        "no-replay": ("no replay buffer", {"replay_buffer": False, "buffer_size": n, "batch_size": n,
                                           "train_every": n, "gradient_steps": 1, "learning_starts": 0}),
        "small-buffer": ("small buffer (1,000)", {"buffer_size": max(1_000, base.batch_size)}),
        "no-decay": ("no exploration decay", {"epsilon_schedule": "constant"}),  # epsilon stays at its start
        "mse": ("MSE loss (not Huber)", {"loss": "mse"}),
        "double": ("Double DQN", {"double_dqn": True}),
        "dueling": ("dueling head", {"dueling": True}),
        "nstep": ("3-step returns", {"n_step": 3}),
        "per": ("prioritized replay", {"prioritized": True}),
    }


# --- plans -------------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One configuration of an experiment: a name, its changes to the base config, its dir name."""

    name: str
    changes: dict[str, Any]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", self.name).strip("-") or "point"


@dataclass
class Plan:
    kind: str  # "ablate" or "sweep"
    base: dict[str, Any]
    points: list[Point]
    seeds: list[int]
    metric: str = "final_return"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": self.base, "seeds": self.seeds, "metric": self.metric,
                "points": [{"name": p.name, "changes": p.changes} for p in self.points]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(data["kind"], data["base"], [Point(p["name"], p["changes"]) for p in data["points"]],
                   data["seeds"], data.get("metric", "final_return"))

    def config(self, point: Point, seed: int) -> C.Config:
        return C.from_dict({**self.base, **point.changes, "seed": seed}, where=f"point '{point.name}'")


def seed_list(base: C.Config, seeds: int) -> list[int]:
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return [base.seed + i for i in range(seeds)]


def ablation_plan(base: C.Config, seeds: int, ids: list[str] | None = None) -> Plan:
    """The lecture's ablation rows (or the variants named by id, extensions included) over `seeds` seeds."""
    variants = ablation_variants(base)
    unknown = [i for i in ids or [] if i not in variants]
    if unknown:
        raise ConfigError(f"unknown variant '{unknown[0]}': choose from {', '.join(variants)}")
    full = base.updated(**CLASSIC).to_dict()
    points = [Point(*variants[i]) for i in ids or TABLE]
    plan = Plan("ablate", full, points, seed_list(base, seeds))
    for point in points:
        plan.config(point, base.seed)  # every variant is a valid config, checked before anything runs
    return plan


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` items -> {key: [v1, v2]}; commas inside [...] (list values) do not split."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"--grid expects key=value1,value2,..., got '{item}'")
        if key not in C.FIELDS:
            raise C.unknown_key_error(key, "--grid")
        grid[key] = [v.strip() for v in re.split(r",(?![^\[]*\])", values)]
    return grid


def _point_name(changes: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())


def _is_range(text: str) -> bool:
    return ":" in text and not text.startswith("[")


def _sample_value(key: str, spec: list[str], rng: random.Random) -> Any:
    """A random value of one key: a choice of the listed values, or from a `lo:hi` range (log-uniform if > 0)."""
    if len(spec) == 1 and _is_range(spec[0]):
        try:
            lo, hi = (float(part) for part in spec[0].split(":", 1))
        except ValueError:
            raise ConfigError(f"--grid {key}={spec[0]}: a range is two numbers lo:hi, e.g. 1e-4:1e-2") from None
        value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if lo > 0 and hi > 0 else rng.uniform(lo, hi)
        return C.coerce(key, round(value) if C._HINTS[key] is int else float(f"{value:.4g}"))
    return C.coerce(key, rng.choice(spec))


def sweep_plan(base: C.Config, grid: dict[str, list[str]], seeds: int, samples: int = 0, sample_seed: int = 0,
               metric: str = "final_return") -> Plan:
    """Every grid point (or `samples` random points) over `seeds` seeds each."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose from {', '.join(METRICS)}")
    if samples > 0:
        rng = random.Random(sample_seed)
        combos = [{k: _sample_value(k, v, rng) for k, v in grid.items()} for _ in range(samples)]
    else:
        ranged = [k for k, v in grid.items() if any(_is_range(x) for x in v)]
        if ranged:
            raise ConfigError(f"--grid {ranged[0]} gives a range: ranges need --samples N (random search)")
        typed = {k: [C.coerce(k, v) for v in vs] for k, vs in grid.items()}
        combos = [dict(zip(typed, values)) for values in itertools.product(*typed.values())]
    points, seen = [], set()
    for changes in combos:
        name = _point_name(changes)
        if name not in seen:
            seen.add(name)
            points.append(Point(name, changes))
    plan = Plan("sweep", base.to_dict(), points, seed_list(base, seeds), metric)
    for point in points:
        plan.config(point, base.seed)
    return plan


def prepare_dir(plan: Plan, out: Path) -> None:
    """Write plan.json, or check that an existing one is the same plan (then finished runs are skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_FILE
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(plan.to_json())):
            raise ConfigError(f"'{out}' holds a different experiment: resume it with `fastdqn {plan.kind} --resume "
                              f"{out}` or pass another --out")
        return
    path.write_text(json.dumps(plan.to_json(), indent=2))


def load_plan(out: Path) -> Plan:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"'{out}' has no {PLAN_FILE}: pass a dir made by `fastdqn ablate` or `fastdqn sweep`")
    return Plan.from_json(json.loads(path.read_text()))


# --- running -----------------------------------------------------------------------------------------------
def run_dir_of(out: Path, point: Point, seed: int) -> Path:
    return out / point.slug / f"seed-{seed}"


def train_one(config_path: str, run_dir: str, threads: int, stop_file: str) -> dict[str, Any]:
    """One run, in a worker process: `fastdqn.train` (or a resume of a stopped run), its output in a log file.

    Returns the run's result line; a finished run's result.json is written here, atomically. Does nothing
    once `stop_file` exists (the experiment is being interrupted: runs already queued must not start).
    """
    import torch

    from fastdqn import api
    from fastdqn.checkpoint import list_checkpoints
    from fastdqn.errors import describe

    if Path(stop_file).exists():
        return {"run_dir": run_dir, "error": "not started: the experiment was interrupted"}
    if threads > 0:
        torch.set_num_threads(threads)
    rdir, log_path = Path(run_dir), Path(run_dir).parent / f"{Path(run_dir).name}.log"
    with log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if list_checkpoints(rdir):
                outcome = api.train(None, rdir, resume=True, show_progress=False)
            else:
                outcome = api.train(C.from_dict(C.load_yaml(config_path), where=config_path), rdir, overwrite=True,
                                    show_progress=False)
        except Exception as exc:  # the run failed: one line for the report, the whole story in its log
            print(f"fastdqn: error: {describe(exc)}", file=log)
            return {"run_dir": run_dir, "error": f"{describe(exc)[:200]} (see {log_path})"}
    result = outcome.summary()
    if not result["interrupted"]:
        tmp = rdir / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, rdir / RESULT_FILE)
    return result


def run_plan(plan: Plan, out: Path, workers: int, on_done: Callable[[Point, int, dict], None] | None = None) -> None:
    """Run every unfinished (point, seed) of the plan, `workers` at a time in worker processes."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    prepare_dir(plan, out)
    stop_file = out / ".stopping"
    stop_file.unlink(missing_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    todo = []
    for seed, point in itertools.product(plan.seeds, plan.points):  # seed-major: a stopped run covers every point
        rdir = run_dir_of(out, point, seed)
        if (rdir / RESULT_FILE).is_file():
            continue
        cfg_path = rdir.parent / f"{rdir.name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(plan.config(point, seed).to_dict(), sort_keys=False))
        todo.append((point, seed, str(cfg_path), str(rdir)))
    if workers == 1:  # in this process, one after the other (no process start-up cost)
        for point, seed, cfg, rdir in todo:
            result = train_one(cfg, rdir, threads, str(stop_file))
            if on_done is not None:
                on_done(point, seed, result)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops as cleanly as Ctrl-C
    try:
        pending = {pool.submit(train_one, cfg, rdir, threads, str(stop_file)): (point, seed)
                   for point, seed, cfg, rdir in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                point, seed = pending.pop(future)
                if on_done is not None:
                    on_done(point, seed, future.result())
    except BaseException:
        # Start no queued run; a running one gets SIGTERM, which makes its Trainer save a checkpoint and stop.
        stop_file.touch()
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)


# --- reading runs back -------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    final_return: float
    auc: float  # mean greedy return over all evaluations: how early and how well it learned
    steps_to_solve: float  # inf when never solved
    episodes_to_solve: float
    wall_time: float
    evals: list[tuple[int, float]]
    train: list[tuple[int, float]]


def read_run(run_dir: Path, solved_return: float) -> RunSummary | None:
    """Summary of a finished run from its metrics.jsonl and result.json; None if it has not finished."""
    if not (run_dir / RESULT_FILE).is_file():
        return None
    result = json.loads((run_dir / RESULT_FILE).read_text())
    evals, train, solved = [], [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            evals.append((rec["step"], rec["mean"]))
            if solved is None and rec["mean"] >= solved_return:
                solved = (rec["step"], rec.get("episodes", math.inf))
        elif rec["kind"] == "train" and rec.get("recent_return") is not None:
            train.append((rec["step"], rec["recent_return"]))
    return RunSummary(evals[-1][1], statistics.fmean(m for _, m in evals), solved[0] if solved else math.inf,
                      solved[1] if solved else math.inf, result["wall_time"], evals, train)


# Metric name -> (column title, higher is better).
METRICS = {"final_return": ("final greedy return", True), "auc": ("mean eval return", True),
           "steps_to_solve": ("env steps to solve", False), "episodes_to_solve": ("episodes to solve", False)}


@dataclass
class PointSummary:
    point: Point
    runs: list[RunSummary]
    seeds: int

    def values(self, metric: str) -> list[float]:
        return [getattr(r, metric) for r in self.runs]

    def median(self, metric: str) -> float:
        return statistics.median(self.values(metric)) if self.runs else math.nan

    @property
    def solved(self) -> int:
        return sum(math.isfinite(r.steps_to_solve) for r in self.runs)


def summarize(plan: Plan, out: Path) -> list[PointSummary]:
    solved_return = float(plan.base["solved_return"])
    summaries = []
    for point in plan.points:
        runs = [read_run(run_dir_of(out, point, s), solved_return) for s in plan.seeds]
        summaries.append(PointSummary(point, [r for r in runs if r is not None], len(plan.seeds)))
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


def solved_definition(plan: Plan) -> str:
    b = plan.base
    return (f"Solved: a greedy evaluation ({b['eval_episodes']} episodes, every {b['eval_every']:,} env steps and at "
            f"the end of {b['total_steps']:,}) with mean return >= {b['solved_return']:g}. Episodes to solve: "
            f"training episodes finished by that evaluation, median (min-max) over seeds. Final greedy return: "
            f"mean +- std over seeds of each run's last evaluation. Wall time: mean per run.")


def table_rows(plan: Plan, summaries: list[PointSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ablation table, or of the sweep table sorted by the plan's metric."""
    if plan.kind == "ablate":
        header = ["variant", "solved", "episodes to solve", "env steps to solve", "final greedy return",
                  "wall time (s)"]
        ordered = summaries
    else:
        keys = list(dict.fromkeys(k for p in plan.points for k in p.changes))
        header = ["rank", *keys, "solved", "episodes to solve", "env steps to solve", "final greedy return",
                  "mean eval return", "wall time (s)"]
        ordered = sorted(summaries, key=lambda s: _sort_key(s, plan.metric))
    rows = []
    for rank, s in enumerate(ordered, 1):
        cells = [f"{s.solved}/{len(s.runs)}" + (f" ({len(s.runs)} of {s.seeds} runs done)" if len(s.runs) < s.seeds
                                                 else ""),
                 _median_range(s.values("episodes_to_solve")), _median_range(s.values("steps_to_solve")),
                 _mean_std(s.values("final_return"))]
        if plan.kind == "ablate":
            rows.append([s.point.name, *cells, _wall(s)])
        else:
            rows.append([str(rank), *(json.dumps(s.point.changes.get(k)) for k in keys), *cells,
                         _mean_std(s.values("auc")), _wall(s)])
    return header, rows


def _wall(s: PointSummary) -> str:
    return f"{statistics.fmean(s.values('wall_time')):.1f}" if s.runs else "-"


def _sort_key(s: PointSummary, metric: str) -> tuple[float, float]:
    """Best first: the metric's median (sign-flipped where higher is better), then the mean eval return."""
    if not s.runs:
        return (math.inf, math.inf)
    higher_better = METRICS[metric][1]
    value = s.median(metric)
    return (-value if higher_better else value, -s.median("auc"))


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


# --- plot --------------------------------------------------------------------------------------------------
def plot_curves(plan: Plan, summaries: list[PointSummary], path: Path) -> None:
    """Greedy eval return and training return against env steps: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, attr, title in ((axes[0], "evals", "greedy evaluation return"),
                            (axes[1], "train", "training return (mean of last 20 episodes)")):
        for s in summaries:
            runs = [getattr(r, attr) for r in s.runs if getattr(r, attr)]
            if not runs:
                continue
            grid = np.linspace(max(run[0][0] for run in runs), min(run[-1][0] for run in runs), 101)
            curves = [np.interp(grid, *zip(*run)) for run in runs]
            stack = np.array(curves)
            line, = ax.plot(grid, stack.mean(0), label=f"{s.point.name} ({len(curves)} seeds)")
            ax.fill_between(grid, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.15)
        ax.axhline(float(plan.base["solved_return"]), color="grey", linestyle="--", linewidth=0.8)
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
def best_config(plan: Plan, summaries: list[PointSummary]) -> C.Config | None:
    finished = [s for s in summaries if s.runs]
    if not finished:
        return None
    best = min(finished, key=lambda s: _sort_key(s, plan.metric))
    return C.from_dict({**plan.base, **best.point.changes})


class Report(NamedTuple):
    markdown: str  # the table and the note, as written to results.md
    table: Any  # the same table for the console (rich)
    note: str  # how to read it: what "solved" means, what is sorted


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
    markdown = f"{markdown_table(header, rows)}\n\n{note}\n"
    (out / TABLE_FILE).write_text(markdown)
    if plan.kind == "ablate":
        plot_curves(plan, summaries, out / PLOT_FILE)
    else:
        with (out / CSV_FILE).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        best = best_config(plan, summaries)
        if best is not None:
            (out / BEST_FILE).write_text(f"# best point of the sweep in {out} by {plan.metric}; "
                                         f"use with: fastdqn train --config {out / BEST_FILE}\n"
                                         + yaml.safe_dump(best.to_dict(), sort_keys=False))
    return Report(markdown, rich_table(title, header, rows), note)


def default_out(kind: str, root: Path) -> Path:
    return root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"



def execute(plan: Plan, out: Path, workers: int) -> int:
    """Run the plan's unfinished runs with a line per finished run, then write and print the report."""
    from fastdqn.logs import console

    total = len(plan.points) * len(plan.seeds)
    console.print(f"[bold]fastdqn {plan.kind}[/]: {len(plan.points)} points x {len(plan.seeds)} seeds = {total} runs, "
                  f"{workers} at a time, in {out} (stop with Ctrl-C; the same command with --resume {out} goes on)")
    failures: list[str] = []
    start = time.perf_counter()

    def on_done(point: Point, seed: int, result: dict) -> None:
        if "error" in result:
            failures.append(f"{point.name} seed {seed}: {result['error']}")
            console.print(f"[red]failed[/] {point.name} seed {seed}: {result['error']}")
        elif result["interrupted"]:
            console.print(f"[yellow]stopped[/] {point.name} seed {seed} at env step {result['env_steps']}")
        else:
            console.print(f"done {point.name} seed {seed}: final greedy return {result['final_eval_mean']:.1f}, "
                          f"{result['wall_time']:.0f} s ({time.perf_counter() - start:.0f} s elapsed)")

    try:
        run_plan(plan, out, workers, on_done)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: finished runs are kept; continue with: "
                      f"fastdqn {plan.kind} --resume {out}[/]")
        return 130
    result = report(out)
    console.print(result.table)
    console.print(result.note)
    console.print(f"table: {out / TABLE_FILE}" + (f", plot: {out / PLOT_FILE}" if plan.kind == "ablate" else
                                                  f", csv: {out / CSV_FILE}, best config: {out / BEST_FILE}"))
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed[/]: " + "; ".join(failures))
        return 1
    return 0
