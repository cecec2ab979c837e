"""One run of an experiment as a worker trains it, whatever the backend (a local process or a Ray task).

`train_job` trains a new run or resumes a stopped one from its newest checkpoint through `fastdqn.train`, with
the run's console output in `<point>/seed-<s>.log`, and marks it finished with `result.json`. It is safe to
run again: a finished run returns its result, a retried one (its worker died) resumes, and while another
process still holds the run dir (a retry that overlaps the attempt it replaces) it waits for it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdqn.outcomes import read_result, write_result
from fastdqn.plans import Point

if TYPE_CHECKING:
    from fastdqn.search import TrialRef
    from fastdqn.tracking import Tracking

LOCK_WAIT_S = 120.0  # how long a run waits for another process to leave its run dir
LOCK_POLL_S = 1.0


@dataclass(frozen=True)
class RunJob:
    """A run to train: its point and seed, its config file and run dir (absolute paths), and optionally the
    Optuna trial it reports its evaluations to and where its scalars are tracked."""

    point: Point
    seed: int
    config_path: str
    run_dir: str
    trial: TrialRef | None = None
    track: Tracking | None = None
    members: tuple[RunJob, ...] = ()  # a population job: these runs (one point, its seeds) train as one process

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir).parent / f"{Path(self.run_dir).name}.log"


def population_job(members: list[RunJob]) -> RunJob:
    """The runs `members` (the seeds of one point, or of points that differ only in keys an agent may set) as one
    population job: `run_dir` is the population's dir beside the first member's, its config the first member's."""
    first = members[0]
    rdir = Path(first.run_dir).parent / "population"
    return RunJob(first.point, first.seed, first.config_path, str(rdir), members=tuple(members))


def train_job(job: RunJob, threads: int = 0) -> dict[str, Any]:
    """Train (or resume, or just report) the job's run; returns its result line, or one with an "error".

    A run the search pruned gets `"pruned": true` and a result.json (it is over, and never run again), but
    keeps its checkpoint: `fastdqn train --resume` continues it like any stopped run.
    """
    import torch

    from fastdqn.errors import RunDirLocked, describe

    rdir = Path(job.run_dir)
    finished = read_result(rdir)
    if finished is not None:
        return finished
    if job.members:
        return train_population_job(job, threads)
    if threads > 0:
        torch.set_num_threads(threads)
    deadline = time.monotonic() + LOCK_WAIT_S
    with job.log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        while True:
            try:
                outcome = _train(job, rdir)
                break
            except RunDirLocked as exc:
                if time.monotonic() > deadline:
                    print(f"fastdqn: error: {describe(exc)}", file=log)
                    return {"run_dir": job.run_dir, "error": describe(exc)[:300], "locked": True}
                time.sleep(LOCK_POLL_S)
            except Exception as exc:  # the run failed: one line for the report, the whole story in its log
                print(f"fastdqn: error: {describe(exc)}", file=log)
                return {"run_dir": job.run_dir, "error": f"{describe(exc)[:200]} (see {job.log_path})"}
    result = {**outcome.summary(), "pruned": outcome.stopped_early}
    if not result["interrupted"] or result["pruned"]:
        write_result(rdir, result)
    return result


def train_population_job(job: RunJob, threads: int = 0) -> dict[str, Any]:
    """Train (or resume, or just report) a population job; returns {"members": [each member's result line]} (a
    failure gives every member the error). Each member run dir gets its result.json as a single run's would."""
    import torch

    from fastdqn import api
    from fastdqn import config as C
    from fastdqn.errors import describe
    from fastdqn.population import AGENT_KEYS, POPULATION_FILE

    done = [read_result(Path(m.run_dir)) for m in job.members]
    if all(r is not None for r in done):
        return {"members": done}
    if threads > 0:
        torch.set_num_threads(threads)
    rdir = Path(job.run_dir)
    with job.log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if (rdir / POPULATION_FILE).is_file():
                outcome = api.train_population(None, rdir, resume=True, show_progress=False)
            else:
                cfgs = [C.from_dict(C.load_yaml(m.config_path), where=m.config_path) for m in job.members]
                values = {
                    key: [getattr(c, key) for c in cfgs]
                    for key in ("seed", *AGENT_KEYS)
                    if key == "seed" or len({getattr(c, key) for c in cfgs}) > 1
                }
                outcome = api.train_population(
                    cfgs[0].updated(agents=len(job.members)),
                    rdir,
                    values=values,
                    dirs=[Path(m.run_dir) for m in job.members],
                    overwrite=True,
                    show_progress=False,
                )
        except Exception as exc:
            print(f"fastdqn: error: {describe(exc)}", file=log)
            error = f"{describe(exc)[:200]} (see {job.log_path})"
            return {"members": [{"run_dir": m.run_dir, "error": error} for m in job.members]}
    results = []
    for member, agent, before in zip(job.members, outcome.agents, done):
        result = before or {**agent.summary(), "pruned": False, "population": str(rdir)}
        if before is None and not result["interrupted"]:  # a member that had finished keeps its result
            write_result(Path(member.run_dir), result)
        results.append(result)
    return {"members": results}


def run_dir_in_use(run_dir: Path) -> bool:
    """Does a process train in `run_dir` now (holds its lock)?"""
    from fastdqn.errors import RunDirLocked
    from fastdqn.rundir import RunDirLock

    if not Path(run_dir).is_dir():
        return False
    try:
        with RunDirLock(Path(run_dir)):
            return False
    except RunDirLocked:
        return True


def _train(job: RunJob, rdir: Path):
    from fastdqn import api
    from fastdqn import config as C
    from fastdqn.checkpoint import list_checkpoints

    on_eval = None
    if job.trial is not None:
        from fastdqn.search import TrialReporter

        on_eval = TrialReporter(job.trial)
    if rdir.is_dir() and list_checkpoints(rdir):
        return api.train(None, rdir, resume=True, show_progress=False, on_eval=on_eval, track=job.track)
    cfg = C.from_dict(C.load_yaml(job.config_path), where=job.config_path)
    return api.train(cfg, rdir, overwrite=True, show_progress=False, on_eval=on_eval, track=job.track)
