"""What an experiment trains: its points (config changes), seeds, the metric that ranks them, and its dir.

An experiment dir holds `plan.json` (the base config, the points to run and the seeds, or for a searched sweep
the search that picks its points) and, for each point and seed, `<point>/seed-<s>.yaml` (the run's full config)
and the run dir `<point>/seed-<s>/` written by `fastdqn.train`, so a run here is exactly a `fastdqn train` run.
A run whose dir holds `result.json` is finished (or was pruned) and is never run again.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastdqn import config as C
from fastdqn.errors import ConfigError

PLAN_FILE, RESULT_FILE = "plan.json", "result.json"

# Metric name -> (column title, higher is better).
METRICS = {
    "final_return": ("final greedy return", True),
    "best_return": ("best greedy return", True),
    "auc": ("mean eval return", True),
    "steps_to_solve": ("env steps to solve", False),
    "episodes_to_solve": ("episodes to solve", False),
}
SOLVE_METRICS = ("steps_to_solve", "episodes_to_solve")  # meaningless for an env without a solve line

# Each variant changes "full DQN": the config with Double DQN and every extension off.
CLASSIC = {"double_dqn": False, "dueling": False, "n_step": 1, "prioritized": False, "replay_buffer": True}
TABLE = ["full", "no-target", "no-replay", "small-buffer", "no-decay", "mse", "double"]  # the classic rows

# `lo:hi` (log-uniform when lo > 0) or `int:lo:hi` (uniform integers): a range of a searched key.
RANGE = re.compile(r"^(int:)?([-+]?[0-9.]+(?:e[-+]?[0-9]+)?):([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)$", re.IGNORECASE)


def ablation_variants(base: C.Config) -> dict[str, tuple[str, dict[str, Any]]]:
    """Variant id -> (row name, config changes relative to full DQN): the classic rows, then extensions."""
    n = base.num_envs
    return {
        "full": ("full DQN", {}),
        "no-target": ("no target network", {"target_update": "none"}),  # TD targets from the online net
        # A buffer of one vector step: each transition trains exactly one update, in the order it came.
        "no-replay": (
            "no replay buffer",
            {
                "replay_buffer": False,
                "buffer_size": n,
                "batch_size": n,
                "train_every": n,
                "gradient_steps": 1,
                "learning_starts": 0,
                "n_step": 1,
            },
        ),
        "small-buffer": ("small buffer (1,000)", {"buffer_size": max(1_000, base.batch_size)}),
        "no-decay": ("no exploration decay", {"epsilon_schedule": "constant"}),  # epsilon stays at its start
        "mse": ("MSE loss (not Huber)", {"loss": "mse"}),
        "double": ("Double DQN", {"double_dqn": True}),
        "dueling": ("dueling head", {"dueling": True}),
        "nstep": ("3-step returns", {"n_step": 3}),
        "per": ("prioritized replay", {"prioritized": True}),
    }


@dataclass
class Point:
    """One configuration of an experiment: a name, its changes to the base config, its dir name."""

    name: str
    changes: dict[str, Any]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", self.name).strip("-") or "point"


@dataclass
class Search:
    """How a searched sweep picks its points: an Optuna sampler over `space` (the --grid items), `trials`
    runs in all, a pruner that stops bad runs at their evaluations, and the random start both get."""

    sampler: str  # tpe, random or grid
    space: dict[str, list[str]]
    trials: int
    pruner: str = "median"  # median, halving or none
    startup_trials: int = 5  # TPE samples at random and the pruner prunes nothing until this many trials ended
    seed: int = 0


@dataclass
class Plan:
    kind: str  # "ablate" or "sweep"
    base: dict[str, Any]
    points: list[Point]  # empty for a searched sweep: its points are the study's trials
    seeds: list[int]
    metric: str = "final_return"
    search: Search | None = None
    populations: bool = False  # train each point's seeds as one population (one process) where the point can

    def to_json(self) -> dict[str, Any]:
        data = {
            "kind": self.kind,
            "base": self.base,
            "seeds": self.seeds,
            "metric": self.metric,
            "points": [{"name": p.name, "changes": p.changes} for p in self.points],
            "populations": self.populations,
        }
        if self.search is not None:
            data["search"] = asdict(self.search)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        search = Search(**data["search"]) if data.get("search") else None
        return cls(
            data["kind"],
            data["base"],
            [Point(p["name"], p["changes"]) for p in data["points"]],
            data["seeds"],
            data.get("metric", "final_return"),
            search,
            data.get("populations", False),  # plans written before populations: one run per seed
        )

    def config(self, point: Point, seed: int) -> C.Config:
        return C.from_dict({**self.base, **point.changes, "seed": seed}, where=f"point '{point.name}'")

    def population_groups(self) -> list[list[Point]]:
        """The points whose runs train together as one population (one process), when the plan asks for it: the
        points that can be batched (population.unbatchable) grouped by their config apart from the seed and the
        keys an agent may set (population.AGENT_KEYS), each group's points x seeds making one population."""
        from fastdqn.population import AGENT_KEYS, unbatchable

        if not self.populations:
            return []
        groups: dict[str, list[Point]] = {}
        for point in self.points:
            cfg = self.config(point, self.seeds[0])
            if unbatchable(cfg) is None:
                shared = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", *AGENT_KEYS)}
                groups.setdefault(json.dumps(shared, sort_keys=True), []).append(point)
        return [group for group in groups.values() if len(group) * len(self.seeds) > 1]

    @property
    def solve_line(self) -> float | None:
        """The eval return that counts as solved (the env's own unless the config sets one); None: scores only."""
        return C.from_dict(self.base, where=PLAN_FILE).solve_line


def seed_list(base: C.Config, seeds: int) -> list[int]:
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return [base.seed + i for i in range(seeds)]


def ablation_plan(base: C.Config, seeds: int, ids: list[str] | None = None, populations: bool = True) -> Plan:
    """The classic ablation rows (or the variants named by id, extensions included) over `seeds` seeds; with
    `populations` each variant's seeds train as one population where the variant allows."""
    variants = ablation_variants(base)
    unknown = [i for i in ids or [] if i not in variants]
    if unknown:
        raise ConfigError(f"unknown variant '{unknown[0]}': choose from {', '.join(variants)}")
    full = base.updated(**CLASSIC).to_dict()
    points = [Point(*variants[i]) for i in ids or TABLE]
    plan = Plan("ablate", full, points, seed_list(base, seeds), populations=populations)
    for point in points:
        plan.config(point, base.seed)  # every variant is a valid config, checked before anything runs
    return plan


def parse_grid(items: list[str], flag: str = "--grid") -> dict[str, list[str]]:
    """`key=v1,v2` items (of `flag`) -> {key: [v1, v2]}; commas inside [...] (list values) do not split."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"{flag} expects key=value1,value2,..., got '{item}'")
        if key not in C.FIELDS:
            raise C.unknown_key_error(key, flag)
        grid[key] = [v.strip() for v in re.split(r",(?![^\[]*\])", values)]
    return grid


def parse_range(key: str, values: list[str]) -> tuple[bool, float, float] | None:
    """(integer, lo, hi) when a --grid key gives a range (`lo:hi` or `int:lo:hi`), else None."""
    match = RANGE.match(values[0]) if len(values) == 1 else None
    if match is None:
        return None
    integer, lo, hi = bool(match[1]), float(match[2]), float(match[3])
    if not lo < hi:
        raise ConfigError(f"--grid {key}={values[0]}: a range is lo:hi with lo < hi")
    if integer and C._HINTS[key] is not int:
        raise ConfigError(
            f"--grid {key}={values[0]}: int:lo:hi is for integer keys; {key} is a {C.field_type_name(key)}, give lo:hi"
        )
    return integer, lo, hi


def point_name(changes: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose from {', '.join(METRICS)}")


def check_solve_metric(plan: Plan) -> None:
    """A metric that counts steps to solve needs the env to have a solve line."""
    if plan.metric in SOLVE_METRICS and plan.solve_line is None:
        raise ConfigError(
            f"--metric {plan.metric} needs a solve line, and {plan.base['env_id']} has none: set "
            "solved_return or use --metric final_return"
        )


def sweep_plan(
    base: C.Config, grid: dict[str, list[str]], seeds: int, metric: str = "final_return", populations: bool = True
) -> Plan:
    """Every grid point over `seeds` seeds each; with `populations` each point's seeds train as one population
    where the point allows."""
    check_metric(metric)
    ranged = [k for k, v in grid.items() if parse_range(k, v) is not None]
    if ranged:
        raise ConfigError(f"--grid {ranged[0]} gives a range: ranges need a search (--search tpe or random)")
    typed = {k: [C.coerce(k, v) for v in vs] for k, vs in grid.items()}
    points, seen = [], set()
    for values in itertools.product(*typed.values()):
        changes = dict(zip(typed, values))
        name = point_name(changes)
        if name not in seen:
            seen.add(name)
            points.append(Point(name, changes))
    plan = Plan("sweep", base.to_dict(), points, seed_list(base, seeds), metric, populations=populations)
    check_solve_metric(plan)
    for point in points:
        plan.config(point, base.seed)
    return plan


def prepare_dir(plan: Plan, out: Path) -> None:
    """Write plan.json, or check that an existing one is the same plan (then finished runs are skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_FILE
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(plan.to_json())):
            raise ConfigError(
                f"'{out}' holds a different experiment: resume it with `fastdqn {plan.kind} --resume "
                f"{out}` or pass another --out"
            )
        return
    path.write_text(json.dumps(plan.to_json(), indent=2))


def load_plan(out: Path) -> Plan:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"'{out}' has no {PLAN_FILE}: pass a dir made by `fastdqn ablate` or `fastdqn sweep`")
    return Plan.from_json(json.loads(path.read_text()))


def run_dir_of(out: Path, point: Point, seed: int) -> Path:
    return out / point.slug / f"seed-{seed}"
