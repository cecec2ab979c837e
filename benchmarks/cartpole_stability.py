"""Why do CartPole runs end worse than they peaked? Variants of the default config over seeds, every eval curve kept.

    python benchmarks/cartpole_stability.py --variants default,lr-linear --seeds 1 2 3 4 5
    python benchmarks/cartpole_stability.py --report          # rebuild the JSON and table from runs on disk
    python benchmarks/cartpole_stability.py --variants r25-lr-nstep-3,r25-lr-nstep-3-agents \
        --out runs/cartpole-population --json benchmarks/results/cartpole_population.json \
        --plot docs/cartpole-population.png                 # 5 separate runs against one population of 5
    python benchmarks/cartpole_stability.py --variants r25-lr-nstep-3-amp,r25-lr-nstep-3-envs16-compile-amp \
        --out runs/cartpole-stability-amp --json benchmarks/results/cartpole_stability_amp.json \
        --plot docs/cartpole-stability-amp.png              # the --amp table, beside the fp32 one

Each variant is the default config as it was before this investigation (`BEFORE` below) with a few keys
changed, run as an experiment of `fastdqn.experiments` (the runner behind `fastdqn sweep`), one per seed in
`--out/<variant>/s<seed>/`: finished runs are kept, a stopped batch goes on where it stopped, and seeds can be
added to a variant later (a population variant's seeds train together, `fastdqn train --agents <seeds>`: its CPU
time is the population's). Runs go one at a time (start two of these with different variants to use two cores).
The JSON (benchmarks/results/cartpole_stability.json) holds, for every variant and seed, the whole greedy-eval
curve, the final and best eval, the update count and the run's wall and CPU time; the summary counts the seeds
whose *final* evaluation is solved and how well the late evaluations (the last 20% of the run) hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fastdqn.backends import BackendSpec
from fastdqn.bench import cpu_name
from fastdqn.config import Config
from fastdqn.experiments import execute
from fastdqn.outcomes import read_run
from fastdqn.plans import Plan, Point, load_plan, run_dir_of

# The default config before this investigation (fastdqn.Config() with these keys changed back): every variant is
# named for its changes to it. "r25-lr-nstep-3" is today's default.
BEFORE = {"gradient_steps": 128, "lr_schedule": "constant", "n_step": 1}

# Variant name -> changes to the default config before the investigation. Each tests one suspected cause of the
# late collapse (or a cost).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr-linear": {"lr_schedule": "linear"},  # the constant 2.3e-3 keeps moving a solved policy: decay to lr_end 1e-4
    "eps-0.01": {"epsilon_end": 0.01},  # fewer random actions late: does the floor push the data off-policy?
    "polyak": {"target_update": "soft", "tau": 0.005},  # Polyak averaging each update instead of hard copies
    "target-1024": {"target_update_interval": 1024},  # hard copies 4x rarer
    "nstep-3": {"n_step": 3},
    "no-double": {"double_dqn": False},
    "huber-10": {"huber_delta": 10.0},
    "batch-256": {"batch_size": 256},
    "net-64": {"hidden_sizes": [64, 64]},
    "ratio-0.25": {"gradient_steps": 64},  # half the updates: replay ratio 0.25
    "ratio-0.25-lr-linear": {"gradient_steps": 64, "lr_schedule": "linear"},
    # On the cheaper base (half the updates, LR decay), one more change each:
    "r25-lr-polyak": {"gradient_steps": 64, "lr_schedule": "linear", "target_update": "soft", "tau": 0.005},
    "r25-lr-nstep-3": {"gradient_steps": 64, "lr_schedule": "linear", "n_step": 3},
    "r25-lr-eps-0.01": {"gradient_steps": 64, "lr_schedule": "linear", "epsilon_end": 0.01},
    "r25-lr-batch-128": {"gradient_steps": 64, "lr_schedule": "linear", "batch_size": 128},
    "r25-nstep-3": {"gradient_steps": 64, "n_step": 3},  # n-step without the LR decay
    # The flagship command (`fastdqn train --envs 16 --compile`) on the candidate config:
    "r25-lr-nstep-3-envs16-compile": {
        "gradient_steps": 64,
        "lr_schedule": "linear",
        "n_step": 3,
        "num_envs": 16,
        "compile": True,
    },
    # The same two under --amp (bf16 autocast; an MLP stays float32 in it): does amp change what is learned?
    "r25-lr-nstep-3-amp": {"gradient_steps": 64, "lr_schedule": "linear", "n_step": 3, "amp": True},
    "r25-lr-nstep-3-envs16-compile-amp": {
        "gradient_steps": 64,
        "lr_schedule": "linear",
        "n_step": 3,
        "num_envs": 16,
        "compile": True,
        "amp": True,
    },
    # Today's default config trained as one population of all the seeds (`fastdqn train --agents 5`): agent k is the
    # standalone run with its seed to float tolerance, so its table should match the separate runs'.
    "r25-lr-nstep-3-agents": {"gradient_steps": 64, "lr_schedule": "linear", "n_step": 3},
}
POPULATIONS = {"r25-lr-nstep-3-agents"}  # variants whose seeds train together, as one population

OUT_JSON = Path("benchmarks/results/cartpole_stability.json")
CPU_FILE = "cpu_time.json"  # CPU seconds of a run, measured around it (absent for runs resumed or made elsewhere)
LATE = 0.8  # evaluations at or after this fraction of total_steps count as "late"


def variant_plan(name: str, changes: dict[str, Any], seeds: list[int], base: dict[str, Any]) -> Plan:
    return Plan("sweep", base, [Point(name, changes)], seeds, populations=name in POPULATIONS)


def cpu_seconds() -> float:
    """CPU time of this process so far: on a shared machine, closer to an idle run's wall time than wall time is."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def updates(cfg: Config) -> int:
    """Gradient updates a whole run makes (the trainer's schedule: a phase per train_every after warm-up)."""
    last = -(-cfg.total_steps // cfg.num_envs) * cfg.num_envs  # a run stops at the first vector step >= total
    return max(0, last - cfg.learning_starts) // cfg.train_every * cfg.gradient_steps


def run_rows(plan: Plan, out: Path) -> list[dict[str, Any]]:
    """One row per finished seed: final and best eval, the eval curve, wall time and updates."""
    point, solved = plan.points[0], plan.solve_line
    rows = []
    for seed in plan.seeds:
        rdir = run_dir_of(out, point, seed)
        run = read_run(rdir, solved)
        if run is None:
            continue
        cfg = plan.config(point, seed)
        total = cfg.total_steps
        late = [m for s, m in run.evals if s >= LATE * total]
        rows.append(
            {
                "seed": seed,
                "final_eval": run.final_return,
                "best_eval": max(m for _, m in run.evals),
                "steps_to_solve": run.steps_to_solve if run.steps_to_solve != float("inf") else None,
                "late_mean": statistics.fmean(late),
                "late_solved": sum(m >= solved for m in late),
                "late_evals": len(late),
                "wall_time": run.wall_time,
                "updates": updates(cfg),
                "cpu_time": json.loads((out / CPU_FILE).read_text()) if (out / CPU_FILE).is_file() else None,
                "evals": [[s, m] for s, m in run.evals],
            }
        )
    return rows


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(name: str, plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    solved = plan.solve_line
    finals = [r["final_eval"] for r in rows]
    return {
        "variant": name,
        "changes": plan.points[0].changes,
        "seeds": [r["seed"] for r in rows],
        "ended_solved": sum(f >= solved for f in finals),
        "ever_solved": sum(r["steps_to_solve"] is not None for r in rows),
        "final_median": statistics.median(finals) if finals else None,
        "final_mean": statistics.fmean(finals) if finals else None,
        "late_mean": statistics.fmean(r["late_mean"] for r in rows) if rows else None,
        "late_solved_fraction": (
            sum(r["late_solved"] for r in rows) / sum(r["late_evals"] for r in rows) if rows else None
        ),
        "wall_time_median": statistics.median(r["wall_time"] for r in rows) if rows else None,
        "cpu_time_median": median_of([r["cpu_time"] for r in rows if r["cpu_time"] is not None]),
        "updates": rows[0]["updates"] if rows else None,
        "runs": rows,
    }


def markdown(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | changes | seeds | final eval >= 475 | final evals | late evals >= 475 | late mean | "
        "updates | CPU time (s, median) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        if not s["runs"]:
            continue
        finals = ", ".join(f"{r['final_eval']:.0f}" for r in s["runs"])
        changes = ", ".join(f"{k}={v}" for k, v in s["changes"].items()) or "-"
        lines.append(
            f"| {s['variant']} | {changes} | {len(s['runs'])} | {s['ended_solved']}/{len(s['runs'])} | "
            f"{finals} | {100 * s['late_solved_fraction']:.0f}% | {s['late_mean']:.0f} | "
            f"{s['updates']:,} | {'-' if s['cpu_time_median'] is None else round(s['cpu_time_median'])} |"
        )
    return "\n".join(lines)


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    """One panel per variant: every seed's greedy-eval curve, and the solve line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in summaries if s["runs"]]
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, s in zip(axes.flat, shown):
        for r in s["runs"]:
            steps, means = zip(*r["evals"])
            ax.plot(steps, means, linewidth=1, alpha=0.8, label=f"seed {r['seed']}")
        ax.axhline(475, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{s['variant']}: {s['ended_solved']}/{len(s['runs'])} end >= 475", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("env steps")
    fig.supylabel("greedy eval return (10 episodes)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=Path("runs/cartpole-stability"))
    parser.add_argument("--json", type=Path, default=OUT_JSON)
    parser.add_argument("--plot", type=Path, default=Path("docs/cartpole-stability.png"))
    parser.add_argument("--report", action="store_true", help="only rebuild the JSON from the runs in --out")
    args = parser.parse_args()
    base = Config(device="cpu", torch_threads=1, **BEFORE).to_dict()
    if not args.report:
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"unknown variant '{name}': choose from {', '.join(VARIANTS)}")
            # one experiment per seed, so seeds can be added to a variant later; a population's seeds in one
            for seeds in [args.seeds] if name in POPULATIONS else [[seed] for seed in args.seeds]:
                out, before = args.out / name / "-".join(f"s{seed}" for seed in seeds), cpu_seconds()
                if execute(variant_plan(name, VARIANTS[name], seeds, base), out, BackendSpec(workers=1)) == 130:
                    raise SystemExit(130)
                if not (out / CPU_FILE).is_file():  # runs in this process: its CPU time is the run's
                    (out / CPU_FILE).write_text(json.dumps(round(cpu_seconds() - before, 1)))
    summaries = []
    for name in VARIANTS:
        plans = [(load_plan(path.parent), path.parent) for path in sorted((args.out / name).rglob("plan.json"))]
        if plans:
            rows = sorted((row for plan, out in plans for row in run_rows(plan, out)), key=lambda r: r["seed"])
            summaries.append(summarize(name, plans[0][0], rows))
    table = markdown(summaries)
    print(table)
    plot(summaries, args.plot)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": f"{cpu_name()}, {os.cpu_count()} cores, 1 torch thread",
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "late_from": LATE,
                "base": base,
                "variants": summaries,
                "table": table,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
