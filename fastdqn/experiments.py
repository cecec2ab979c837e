"""Ablations and sweeps: many real `fastdqn train` runs on a backend, a progress line as each ends, the reports.

`execute` drives an experiment dir (`fastdqn.plans`): it hands the unfinished runs of a plan, or the trials
that an Optuna study picks (`fastdqn.search`), to a backend (this machine, `fastdqn.backends`, or a Ray
cluster, `fastdqn.ray_backend`) and keeps it as busy as its workers or resources allow. Each run is
`fastdqn.jobs.train_job`, so it is exactly a `fastdqn train` run. Ctrl-C (or SIGTERM) stops the runs, each
with a checkpoint; `--resume DIR` goes on and never runs a finished run again. Reports: `fastdqn.reports`.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from fastdqn.backends import Backend, BackendSpec, LocalBackend
from fastdqn.errors import ConfigError
from fastdqn.jobs import RunJob, population_job, run_dir_in_use
from fastdqn.outcomes import read_result
from fastdqn.plans import METRICS, Plan, Point, prepare_dir, run_dir_of
from fastdqn.reports import BEST_FILE, CSV_FILE, PLOT_FILE, TABLE_FILE, best_point, report, summarize
from fastdqn.tracking import Tracking


def make_backend(spec: BackendSpec, out: Path) -> Backend:
    """The backend the flags name, refusing flags that cannot work before anything is written."""
    if spec.kind == "local":
        return LocalBackend(2 if spec.workers is None else spec.workers, out)
    if spec.kind == "ray":
        from fastdqn.ray_backend import RayBackend

        return RayBackend(spec, out)
    raise ConfigError(f"unknown backend '{spec.kind}': choose local or ray")


def default_out(kind: str, root: Path) -> Path:
    return root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


class PlanRuns:
    """The runs of a fixed plan still to train: first the points whose seeds train as one population (a job
    each), then the single runs seed-major (a stopped experiment has covered every point)."""

    def __init__(self, plan: Plan, out: Path, track: Tracking | None):
        self.plan, self.out, self.track = plan, out, track
        pairs = list(itertools.product(plan.seeds, plan.points))
        todo = [(p, s) for s, p in pairs if read_result(run_dir_of(out, p, s)) is None]
        # (runs tracked on W&B are single runs: a population's agents would share one W&B run)
        groups = [g for g in plan.population_groups() if any(q in g for q, _ in todo)] if track is None else []
        self.todo: deque[RunJob] = deque(
            population_job([make_job(plan, out, p, s, None) for p in group for s in plan.seeds]) for group in groups
        )
        grouped = [p for group in groups for p in group]
        self.todo.extend(make_job(plan, out, p, s, track) for p, s in todo if p not in grouped)
        self.total, self.done = len(pairs), len(pairs) - len(todo)

    def next(self) -> RunJob | None:
        return self.todo.popleft() if self.todo else None

    def ended(self, job: RunJob, result: dict[str, Any]) -> None:
        self.done += 1


class StudyRuns:
    """The runs of a searched sweep: first the trials a stopped driver left running, then new trials that the
    sampler picks, until the study has its number of trials."""

    def __init__(self, plan: Plan, out: Path, track: Tracking | None):
        from fastdqn.search import StudyDriver

        assert plan.search is not None
        self.plan, self.out, self.track = plan, out, track
        self.driver = StudyDriver(plan, out)
        self.stopped = deque(self.driver.stopped())
        self.total = plan.search.trials
        self.done = self.total - self.driver.remaining() - len(self.stopped)

    def next(self) -> RunJob | None:
        while self.stopped:
            number, point = self.stopped.popleft()
            rdir = run_dir_of(self.out, point, self.plan.seeds[0])
            result = read_result(rdir)
            if result is not None:  # it finished, but its driver stopped before telling the study
                self.driver.tell(number, point, result)
                self.done += 1
            elif not run_dir_in_use(rdir):  # else another driver's worker trains it
                return self.job(number, point)
        if self.driver.remaining() > 0:
            return self.job(*self.driver.ask())
        return None

    def job(self, number: int, point: Point) -> RunJob:
        return replace(
            make_job(self.plan, self.out, point, self.plan.seeds[0], self.track), trial=self.driver.ref(number)
        )

    def ended(self, job: RunJob, result: dict[str, Any]) -> None:
        assert job.trial is not None
        self.driver.tell(job.trial.number, job.point, result)
        self.done += 1


def make_job(plan: Plan, out: Path, point: Point, seed: int, track: Tracking | None) -> RunJob:
    """Write the run's config next to its run dir and describe the run with absolute paths (any node reads)."""
    rdir = run_dir_of(out, point, seed).resolve()
    cfg_path = rdir.parent / f"{rdir.name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(plan.config(point, seed).to_dict(), sort_keys=False))
    if track is not None:
        track = replace(
            track,
            group=track.group or out.resolve().name,
            job_type=plan.kind,
            name=f"{out.resolve().name}/{point.slug}/seed-{seed}",
            extra={"study": out.resolve().name, "point": point.name},
        )
    return RunJob(point, seed, str(cfg_path), str(rdir), track=track)


def population_note(plan: Plan) -> str:
    """Which points train as populations (one process each, `fastdqn train --agents K`), for the plan line."""
    groups = plan.population_groups()
    if not groups:
        return ""
    points = sum(len(g) for g in groups)
    sizes = sorted({len(g) * len(plan.seeds) for g in groups})
    many = "s" if len(groups) > 1 else ""
    return (
        f"; {points} of {len(plan.points)} points train as {len(groups)} population{many} of "
        f"{' or '.join(map(str, sizes))} agents (one process each)"
    )


def best_so_far(plan: Plan, out: Path) -> str:
    best = best_point(plan, summarize(plan, out))
    if best is None:
        return ""
    title = METRICS[plan.metric][0]
    return f"; best so far: {best.point.name} ({title} {best.median(plan.metric):,.1f})"


def run_line(job: RunJob, result: dict[str, Any], elapsed: float) -> str:
    what = f"{job.point.name} seed {job.seed}"
    if "error" in result:
        return f"[red]failed[/] {what}: {result['error']}"
    if result.get("pruned"):
        return f"[yellow]pruned[/] {what} at env step {result['env_steps']:,} (checkpoint kept)"
    if result["interrupted"]:
        return f"[yellow]stopped[/] {what} at env step {result['env_steps']:,}"
    return (
        f"done {what}: final greedy return {result['final_eval_mean']:.1f}, {result['wall_time']:.0f} s "
        f"({elapsed:.0f} s elapsed)"
    )


def execute(plan: Plan, out: Path, backend: BackendSpec = BackendSpec(), track: Tracking | None = None) -> int:
    """Run the plan's unfinished runs (or the search's trials) with a line per ended run, then write and print
    the report. Returns the exit code: 0, 1 if a run failed, 130 when stopped."""
    from fastdqn.logs import console

    if track is not None:
        track.check()
    workers: Backend = make_backend(backend, out)  # refuses what cannot work before anything is written
    failures: list[str] = []
    # `kill` stops as cleanly as Ctrl-C, and Ctrl-C (SIGINT) stops even a driver that a shell started in the
    # background, where SIGINT arrives ignored and Python would leave it so
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        prepare_dir(plan, out)
        workers.start(out)
        runs: PlanRuns | StudyRuns = StudyRuns(plan, out, track) if plan.search else PlanRuns(plan, out, track)
        what = (
            f"{plan.search.trials} trials of Optuna's {plan.search.sampler} search"
            if plan.search
            else f"{len(plan.points)} points x {len(plan.seeds)} seeds = {runs.total} runs" + population_note(plan)
        )
        console.print(
            f"[bold]fastdqn {plan.kind}[/]: {what}, {workers.describe()}, in {out} (stop with Ctrl-C; "
            f"`fastdqn {plan.kind} --resume {out}` goes on)"
        )
        start = time.perf_counter()
        while True:
            while workers.running() < workers.capacity() and (job := runs.next()) is not None:
                workers.submit(job)
            if workers.running() == 0:
                break
            for ended, results in workers.wait():
                for job, result in zip(ended.members, results["members"]) if ended.members else [(ended, results)]:
                    runs.ended(job, result)
                    if "error" in result and not result.get("locked"):
                        failures.append(f"{job.point.name} seed {job.seed}: {result['error']}")
                    queued = max(0, runs.total - runs.done - workers.running() * max(1, len(ended.members)))
                    best = best_so_far(plan, out) if plan.kind == "sweep" else ""
                    console.print(
                        f"[{runs.done}/{runs.total} done, {workers.running()} running, {queued} queued] "
                        f"{run_line(job, result, time.perf_counter() - start)}{best}"
                    )
    except KeyboardInterrupt:
        console.print("[yellow]stopping: each running run saves a checkpoint[/]")
        workers.stop()
        console.print(
            f"[yellow]interrupted: finished runs are kept; continue with: fastdqn {plan.kind} --resume {out}[/]"
        )
        return 130
    finally:
        workers.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    written = report(out)
    console.print(written.table)
    console.print(written.note)
    console.print(
        f"table: {out / TABLE_FILE}"
        + (
            f", plot: {out / PLOT_FILE}"
            if plan.kind == "ablate"
            else f", csv: {out / CSV_FILE}, best config: {out / BEST_FILE}"
        )
    )
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed[/]: " + "; ".join(failures))
        return 1
    return 0
