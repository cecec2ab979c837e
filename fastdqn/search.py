"""Searched sweeps: Optuna picks each run's point (TPE, random or grid) and prunes runs at their evaluations.

The study lives in the sweep dir as Optuna's journal file (`study.journal`), so `fastdqn sweep --resume DIR`
goes on with it, and drivers on several machines that share DIR cooperate on one study. Each trial is one run,
with the base config's seed, in `trial-<n>/seed-<s>/`. The run reports the mean return of each periodic
evaluation as an intermediate value (step = env step) and asks the pruner whether to go on; a pruned run stops
like a stopped run (checkpoint kept, resumable) and its result.json says `pruned`.
Optuna maximizes here: a metric where lower is better (env steps to solve) is told negated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdqn import config as C
from fastdqn.errors import ConfigError, import_extra
from fastdqn.outcomes import read_run
from fastdqn.plans import METRICS, Plan, Point, Search, check_metric, check_solve_metric, parse_range, run_dir_of

STUDY_FILE, STUDY_NAME = "study.journal", "fastdqn"
SAMPLERS, PRUNERS = ("tpe", "random", "grid"), ("median", "halving", "none")
IMPORTANCE_MIN_TRIALS = 5  # fewer finished trials say little about which parameter matters


def _optuna():
    return import_extra("optuna", "optuna", "--search")


def distributions(space: dict[str, list[str]]) -> dict[str, Any]:
    """Optuna distributions of the --grid items: `lo:hi` log-uniform (uniform if lo <= 0), `int:lo:hi` uniform
    integers, a list of values categorical (kept as typed; `changes_of` turns them into config values)."""
    optuna = _optuna()
    dists: dict[str, Any] = {}
    for key, values in space.items():
        bounds = parse_range(key, values)
        if bounds is None:
            for value in values:
                C.coerce(key, value)  # a value the key cannot take fails now
            dists[key] = optuna.distributions.CategoricalDistribution(values)
            continue
        integer, lo, hi = bounds
        if integer or C._HINTS[key] is int:
            dists[key] = optuna.distributions.IntDistribution(int(lo), int(hi), log=lo > 0 and not integer)
        else:
            dists[key] = optuna.distributions.FloatDistribution(lo, hi, log=lo > 0)
    return dists


def changes_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's params as config changes."""
    return {k: C.coerce(k, v) for k, v in params.items()}


def search_plan(
    base: C.Config,
    space: dict[str, list[str]],
    sampler: str,
    trials: int | None,
    pruner: str = "median",
    startup_trials: int = 5,
    seed: int = 0,
    metric: str = "final_return",
) -> Plan:
    """A sweep whose points an Optuna study picks: `trials` runs (a grid search: every grid point by default)."""
    check_metric(metric)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown search '{sampler}': choose from {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ConfigError(f"unknown pruner '{pruner}': choose from {', '.join(PRUNERS)}")
    if not space:
        raise ConfigError("--search needs a space: --grid key=lo:hi key=int:lo:hi key=a,b ...")
    dists = distributions(space)
    if sampler == "grid":
        ranged = [k for k, v in space.items() if parse_range(k, v) is not None]
        if ranged:
            raise ConfigError(
                f"--search grid takes listed values: {ranged[0]} gives a range; use --search tpe or random"
            )
        size = math.prod(len(v) for v in space.values())
        trials = size if trials is None else min(trials, size)
    if trials is None or trials < 1:
        raise ConfigError(f"--search {sampler} needs --trials N (N >= 1), got {trials}")
    if startup_trials < 0:
        raise ConfigError(f"--startup-trials must be >= 0, got {startup_trials}")
    search = Search(sampler, space, trials, pruner, startup_trials, seed)
    plan = Plan("sweep", base.to_dict(), [], [base.seed], metric, search)
    check_solve_metric(plan)
    for corner in ("low", "high"):  # both ends of every range (and the first listed values) make valid configs
        params = {k: d.choices[0] if hasattr(d, "choices") else getattr(d, corner) for k, d in dists.items()}
        plan.config(Point(f"{corner} end of the space", changes_of(params)), base.seed)
    return plan


def make_sampler(search: Search):
    optuna = _optuna()
    if search.sampler == "tpe":  # constant_liar: runs in flight count as bad, so parallel trials spread out
        return optuna.samplers.TPESampler(n_startup_trials=search.startup_trials, seed=search.seed, constant_liar=True)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed)
    return optuna.samplers.GridSampler(search.space, seed=search.seed)


def make_pruner(search: Search, total_steps: int):
    """No run is pruned in its first quarter (DQN's early evaluations say little), nor before `startup_trials`
    trials have ended (median); successive halving keeps the best third at each rung (a quarter, 3x, ...)."""
    optuna = _optuna()
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=total_steps // 4)
    if search.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, total_steps // 4), reduction_factor=3)
    return optuna.pruners.NopPruner()


def journal(path: Path):
    """Optuna's journal file storage: appends under a lock file that works on NFS too, and that a killed holder
    leaves for 30 s at most; so several processes and machines can share it."""
    optuna = _optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(plan: Plan, out: Path):
    """The sweep's study, created on first use."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert plan.search is not None
    return optuna.create_study(
        study_name=STUDY_NAME,
        storage=journal(Path(out) / STUDY_FILE),
        sampler=make_sampler(plan.search),
        pruner=make_pruner(plan.search, int(plan.base["total_steps"])),
        direction="maximize",
        load_if_exists=True,
    )


def trial_point(number: int, params: dict[str, Any]) -> Point:
    return Point(f"trial {number}", changes_of(params))


def study_points(plan: Plan, out: Path) -> list[tuple[Point, str]]:
    """Every trial of the sweep so far, in order: its point and its Optuna state (complete, pruned, fail,
    running; waiting ones have not been asked yet and are left out)."""
    trials = open_study(plan, out).get_trials(deepcopy=False)
    return [(trial_point(t.number, t.params), t.state.name.lower()) for t in trials if t.state.name != "WAITING"]


def importances(plan: Plan, out: Path) -> tuple[dict[str, float], int]:
    """Optuna's parameter importances (its default evaluator) over the finished trials, and how many there
    were; empty while fewer than IMPORTANCE_MIN_TRIALS trials finished or only one point was tried."""
    assert plan.search is not None, "importances are those of a searched sweep"
    optuna = _optuna()
    study = open_study(plan, out)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = [k for k in plan.search.space if len({repr(t.params.get(k)) for t in finished}) > 1]
    if len(finished) < IMPORTANCE_MIN_TRIALS or not varied:
        return {}, len(finished)
    return dict(optuna.importance.get_param_importances(study)), len(finished)


@dataclass(frozen=True)
class TrialRef:
    """What a run needs to report to its trial: the study's journal file, the trial number, the search."""

    journal: str
    number: int
    search: Search
    total_steps: int


class TrialReporter:
    """A run's `on_eval`: reports each evaluation's mean return to its trial and asks the pruner to go on."""

    def __init__(self, ref: TrialRef):
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = journal(Path(ref.journal))
        study = optuna.load_study(
            study_name=STUDY_NAME,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=make_pruner(ref.search, ref.total_steps),
        )
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(STUDY_NAME), ref.number
        )
        self.trial = optuna.trial.Trial(study, trial_id)
        self.reported = set(storage.get_trial(trial_id).intermediate_values)  # a resumed run's earlier evaluations

    def __call__(self, step: int, mean: float) -> bool:
        if step not in self.reported:
            self.trial.report(mean, step)
            self.reported.add(step)
        return self.trial.should_prune()


class StudyDriver:
    """The driver's side of a searched sweep: which trial runs next (a stopped one first, then a new one asked
    of the sampler) and what each run's end tells the study."""

    def __init__(self, plan: Plan, out: Path):
        assert plan.search is not None
        self.plan, self.out, self.search = plan, Path(out), plan.search
        self.study = open_study(plan, out)
        self.dists = distributions(self.search.space)

    def stopped(self) -> list[tuple[int, Point]]:
        """Trials left RUNNING by a driver that stopped (Ctrl-C, a crash): to resume, or tell if they finished."""
        optuna = _optuna()
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [(t.number, trial_point(t.number, t.params)) for t in running]

    def remaining(self) -> int:
        """New trials still to ask: the plan's number less every trial that ran, runs or is done."""
        optuna = _optuna()
        started = self.study.get_trials(
            deepcopy=False, states=tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING)
        )
        return max(0, self.search.trials - len(started))

    def ask(self) -> tuple[int, Point]:
        trial = self.study.ask(self.dists)
        return trial.number, trial_point(trial.number, trial.params)

    def ref(self, number: int) -> TrialRef:
        return TrialRef(str((self.out / STUDY_FILE).resolve()), number, self.search, int(self.plan.base["total_steps"]))

    def tell(self, number: int, point: Point, result: dict[str, Any]) -> None:
        """Tell the study how the trial's run ended; a stopped run (resumed later) or one that another process
        trains tells nothing."""
        optuna = _optuna()
        state = optuna.trial.TrialState
        if result.get("locked") or (result.get("interrupted") and not result.get("pruned")):
            return
        if result.get("pruned"):
            self.study.tell(number, state=state.PRUNED, skip_if_finished=True)
            return
        value = self.value(point) if "error" not in result else math.nan
        if math.isnan(value):
            self.study.tell(number, state=state.FAIL, skip_if_finished=True)
        else:
            self.study.tell(number, value, skip_if_finished=True)

    def value(self, point: Point) -> float:
        """The objective of a finished trial: its run's metric, negated where lower is better."""
        run = read_run(run_dir_of(self.out, point, self.plan.seeds[0]), self.plan.solve_line)
        if run is None:
            return math.nan
        value = getattr(run, self.plan.metric)
        return value if METRICS[self.plan.metric][1] else -value
