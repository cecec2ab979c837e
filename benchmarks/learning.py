"""Classic-control learning results: each env's config over seeds, beside rl-zoo's published DQN score and SB3.

    python benchmarks/learning.py --envs acrobot --seeds 1 2 3 4 5 [--workers 1]
    python benchmarks/learning.py --envs acrobot --seeds 1 2 --sb3-python /path/to/sb3-venv/bin/python --sb3-only
    python benchmarks/learning.py --envs mountaincar --seeds 1 --set num_envs=16   # a variant of the config
    python benchmarks/learning.py --report        # rebuild docs/results/ from the runs on disk

Each env's runs are an experiment of `fastdqn.experiments` (the runner behind `fastdqn sweep`: `fastdqn.train`
in worker processes, finished runs kept, a stopped batch goes on) over `configs/<env>.yaml` with one torch
thread on the CPU, in `--out/<env>/`; asking for more seeds later adds them to it. With `--sb3-python`, the same
seeds also run Stable-Baselines3's DQN (benchmarks/sb3_dqn.py, in that interpreter's venv) with the config's
hyperparameters translated to SB3's names; keys SB3's DQN has no equivalent for are listed in the output. Writes
benchmarks/results/learning-<env>.json (every run's eval curve, final and best eval, env steps, wall time,
the machine's load), docs/results/<env>.md (the table) and docs/results/<env>.png (the curves), and
docs/results/README.md (one line per env). A variant (`--set KEY=VALUE`: the evidence for a choice in a config)
runs in `--out/<env>+KEY=VALUE/` and writes benchmarks/results/learning-<env>+KEY=VALUE.json, listed on the
env's page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fastdqn.backends import BackendSpec
from fastdqn.bench import cpu_name
from fastdqn.config import Config, from_dict, load_yaml, parse_set
from fastdqn.experiments import execute
from fastdqn.outcomes import read_run
from fastdqn.plans import PLAN_FILE, Plan, Point, load_plan, run_dir_of

ROOT = Path(__file__).resolve().parents[1]


# Short name -> config, and rl-zoo's published DQN result for the env (benchmark.md of rl-baselines3-zoo:
# mean greedy return of the trained agent, and the env steps it trained for). LunarLander's is for v2, the
# version gymnasium 1.x replaced by v3 (the same task with bug fixes).
ENVS: dict[str, dict[str, Any]] = {
    "cartpole": {"config": "configs/cartpole.yaml", "zoo": 500.0, "zoo_steps": 50_000, "zoo_env": "CartPole-v1"},
    "acrobot": {"config": "configs/acrobot.yaml", "zoo": -76.6, "zoo_steps": 100_000, "zoo_env": "Acrobot-v1"},
    "mountaincar": {
        "config": "configs/mountaincar.yaml",
        "zoo": -100.8,
        "zoo_steps": 120_000,
        "zoo_env": "MountainCar-v0",
    },
    "lunarlander": {
        "config": "configs/lunarlander.yaml",
        "zoo": 154.4,
        "zoo_steps": 100_000,
        "zoo_env": "LunarLander-v2",
    },
}


def env_config(name: str, changes: dict[str, Any] | None = None) -> Config:
    """The env's shipped config with `changes`, on the CPU with one torch thread (how every figure here is measured)."""
    return from_dict({**load_yaml(ROOT / ENVS[name]["config"]), **(changes or {}), "device": "cpu", "torch_threads": 1})


def variant_dir(name: str, changes: dict[str, str]) -> str:
    """The experiment dir (and JSON) name of the env's config with `changes`: `mountaincar+num_envs=16`."""
    return name + "".join(f"+{key}={value}" for key, value in sorted(changes.items()))


def setting(key: str, value: Any) -> str:
    """`key=value` as a user types it after --set or in YAML (booleans lowercase)."""
    return f"{key}={json.dumps(value) if isinstance(value, bool) else value}"


def sb3_hyperparams(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """SB3 DQN keyword arguments for the same run (one env), and the config keys SB3's DQN cannot match."""
    params = {
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "buffer_size": cfg.buffer_size,
        "learning_starts": cfg.learning_starts,
        "gamma": cfg.gamma,
        "train_freq": cfg.train_every,
        "gradient_steps": cfg.gradient_steps,
        "target_update_interval": cfg.target_update_interval,
        "exploration_initial_eps": cfg.epsilon_start,
        "exploration_final_eps": cfg.epsilon_end,
        "exploration_fraction": min(1.0, cfg.epsilon_decay_steps / cfg.total_steps),
        "max_grad_norm": cfg.max_grad_norm or 1e9,
        "net_arch": cfg.hidden_sizes,
    }
    if cfg.lr_schedule == "linear":
        params["learning_rate_end"] = cfg.lr_end  # sb3_dqn.py turns the pair into SB3's linear schedule
    unmatched = [
        setting(k, v)
        for k, v, same in (
            ("double_dqn", cfg.double_dqn, not cfg.double_dqn),
            ("n_step", cfg.n_step, cfg.n_step == 1),
            ("dueling", cfg.dueling, not cfg.dueling),
            ("prioritized", cfg.prioritized, not cfg.prioritized),
            ("target_update", cfg.target_update, cfg.target_update == "hard"),
            ("loss", cfg.loss, cfg.loss == "huber" and cfg.huber_delta == 1.0),
            ("epsilon_schedule", cfg.epsilon_schedule, cfg.epsilon_schedule == "linear"),
            ("normalize_obs", cfg.normalize_obs, not cfg.normalize_obs),
            ("clip_rewards", cfg.clip_rewards, not cfg.clip_rewards),
        )
        if not same
    ]
    if cfg.num_envs != 1:
        unmatched.append(f"num_envs={cfg.num_envs} (SB3 runs 1 env; every count is in env steps in both)")
    return params, unmatched


def env_plan(name: str, seeds: list[int], changes: dict[str, str], out: Path) -> Plan:
    """The plan of `seeds`, joined with the seeds of the same config already planned in `out` (so runs add up)."""
    plan = Plan("sweep", env_config(name, changes).to_dict(), [Point("config", {})], seeds)
    if (out / PLAN_FILE).is_file():
        old = load_plan(out)
        if old.base == plan.base and old.points == plan.points:
            plan.seeds = sorted(set(old.seeds) | set(seeds))
            (out / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=2))
    return plan


def stamp_load(out: Path, plan: Plan) -> None:
    """Add the machine's load now, when the env's runs have ended, to each result.json that has none yet (each run
    records its own CPU time: on a shared machine it compares trainers more fairly than wall time)."""
    for seed in plan.seeds:
        path = run_dir_of(out, plan.points[0], seed) / "result.json"
        if path.is_file():
            data = json.loads(path.read_text())
            data.setdefault("load_after", round(os.getloadavg()[0], 2))
            path.write_text(json.dumps(data))


def sb3_command(name: str, seed: int, python: str, out: Path) -> list[str]:
    """The command of one SB3 run of the env's config (benchmarks/sb3_dqn.py in `python`'s venv), writing `out`."""
    cfg = env_config(name)
    params, _ = sb3_hyperparams(cfg)
    return [
        python,
        str(ROOT / "benchmarks" / "sb3_dqn.py"),
        "--env",
        cfg.env_id,
        "--seed",
        str(seed),
        "--hyperparams",
        json.dumps(params),
        "--total-steps",
        str(cfg.total_steps),
        "--eval-every",
        str(cfg.eval_every),
        "--eval-episodes",
        str(cfg.eval_episodes),
        "--out",
        str(out),
    ]


def run_sb3(name: str, seed: int, python: str, out: Path) -> None:
    """One SB3 run into out/sb3-seed-<seed>.json (kept: a finished run is not run again)."""
    path = out / f"sb3-seed-{seed}.json"
    if path.is_file():
        return
    tmp = path.with_suffix(".tmp")
    subprocess.run(sb3_command(name, seed, python, tmp), check=True)
    loads = os.getloadavg()
    data = json.loads(tmp.read_text())
    data["load_after"] = round(loads[0], 2)
    path.write_text(json.dumps(data))
    tmp.unlink()


def fastdqn_rows(plan: Plan, out: Path) -> list[dict[str, Any]]:
    rows = []
    for seed in plan.seeds:
        rdir = run_dir_of(out, plan.points[0], seed)
        run = read_run(rdir, plan.solve_line)
        if run is None:
            continue
        result = json.loads((rdir / "result.json").read_text())
        rows.append(
            {
                "seed": seed,
                "final_eval": run.final_return,
                "best_eval": max(m for _, m in run.evals),
                "env_steps": result["env_steps"],
                "wall_time": run.wall_time,
                "cpu_time": result.get("cpu_time"),
                "load_after": result.get("load_after"),
                "evals": [[s, m] for s, m in run.evals],
            }
        )
    return rows


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_report(name: str, out: Path) -> dict[str, Any] | None:
    """The JSON record of the env's runs in `out` (the shipped config or a variant), or None if nothing ran."""
    if not (out / PLAN_FILE).is_file():
        return None
    plan = load_plan(out)
    cfg = from_dict(plan.base)
    shipped = env_config(name).to_dict()
    rows = fastdqn_rows(plan, out)
    sb3 = [json.loads(p.read_text()) for p in sorted(out.glob("sb3-seed-*.json"))]
    for run in sb3:  # the final evaluation is one of the run's evaluations (older files kept it apart)
        run["best_eval"] = max(run["best_eval"], run["final_eval"])
    params, unmatched = sb3_hyperparams(cfg)
    spec = ENVS[name]
    record = {
        "env": name,
        "dir": out.name,
        "env_id": cfg.env_id,
        "config": spec["config"],
        "solve_line": cfg.solve_line,
        "changes": {k: v for k, v in plan.base.items() if shipped.get(k) != v},  # from the config as shipped now
        "rl_zoo": {"env_id": spec["zoo_env"], "mean_return": spec["zoo"], "env_steps": spec["zoo_steps"]},
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, 1 torch thread",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "fastdqn": {
            "runs": rows,
            "final_median": median([r["final_eval"] for r in rows]),
            "best_median": median([r["best_eval"] for r in rows]),
            "wall_time_median": median([r["wall_time"] for r in rows]),
            "cpu_time_median": median([r["cpu_time"] for r in rows if r["cpu_time"] is not None]),
        },
        "sb3": {
            "hyperparams": params,
            "unmatched": unmatched,
            "runs": sb3,
            "final_median": median([r["final_eval"] for r in sb3]),
            "wall_time_median": median([r["wall_time"] for r in sb3]),
            "cpu_time_median": median([r["cpu_time"] for r in sb3 if r.get("cpu_time") is not None]),
        },
    }
    return record


def seeds(runs: list[dict[str, Any]]) -> str:
    return f"{len(runs)} seed" + ("" if len(runs) == 1 else "s")


def markdown(record: dict[str, Any], variants: list[dict[str, Any]] = ()) -> str:
    """The env's page: its runs beside rl-zoo and SB3, then one line per variant of its config."""
    zoo, fd, sb3 = record["rl_zoo"], record["fastdqn"], record["sb3"]
    lines = [
        f"# {record['env_id']}",
        "",
        f"`python benchmarks/learning.py --envs {record['env']}` ({record['config']}, on the CPU with one torch "
        f"thread; {record['machine']}; {record['date']}). Final eval: the greedy evaluation at the end of the "
        "run (10 episodes on separately seeded envs); best eval: the best of the evaluations along the way. "
        "Raw numbers and every eval curve: "
        f"`benchmarks/results/learning-{record['env']}.json`.",
        "",
        "| trainer | seed | final eval | best eval | env steps | wall time (s) | CPU time (s) | load after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for who, runs in (("fastdqn", fd["runs"]), ("SB3 DQN", sb3["runs"])):
        for r in runs:
            load = "-" if r.get("load_after") is None else f"{r['load_after']:.1f}"
            cpu = "-" if r.get("cpu_time") is None else f"{r['cpu_time']:.0f}"
            lines.append(
                f"| {who} | {r['seed']} | {r['final_eval']:.1f} | {r['best_eval']:.1f} | {r['env_steps']:,} | "
                f"{r['wall_time']:.0f} | {cpu} | {load} |"
            )
    lines += [
        "",
        f"- rl-zoo's published DQN ({zoo['env_id']}, {zoo['env_steps']:,} env steps): {zoo['mean_return']:g}.",
    ]
    if fd["runs"]:
        verdict = "at or above" if fd["final_median"] >= zoo["mean_return"] else "below"
        lines.append(
            f"- fastdqn: median final eval {fd['final_median']:.1f} over {seeds(fd['runs'])} ({verdict} "
            f"rl-zoo's score), median best eval {fd['best_median']:.1f}; median wall time "
            f"{fd['wall_time_median']:.0f} s."
        )
    if sb3["runs"]:
        ratio = (
            f"; fastdqn's median wall time is {fd['wall_time_median'] / sb3['wall_time_median']:.2f}x SB3's"
            if fd["runs"]
            else ""
        )
        if fd["runs"] and fd.get("cpu_time_median") and sb3.get("cpu_time_median"):
            ratio += f", its median CPU time {fd['cpu_time_median'] / sb3['cpu_time_median']:.2f}x"
        lines.append(
            f"- SB3 DQN, the same hyperparameters: median final eval {sb3['final_median']:.1f} over "
            f"{seeds(sb3['runs'])}, median wall time {sb3['wall_time_median']:.0f} s{ratio}."
        )
        if sb3["unmatched"]:
            lines.append(f"- Not in SB3's DQN, so its runs differ in: {', '.join(sb3['unmatched'])}.")
    if record["solve_line"] is not None:
        lines.append(f"- Solve line of {record['env_id']}: {record['solve_line']:g}.")
    for v in variants:
        runs = v["fastdqn"]["runs"]
        change = " ".join(f"--set {setting(k, val)}" for k, val in sorted(v["changes"].items()))
        lines.append(
            f"- Variant `{change}` ({seeds(runs)}: "
            + ", ".join(f"seed {r['seed']} final {r['final_eval']:.1f}, best {r['best_eval']:.1f}" for r in runs)
            + f"): `benchmarks/results/learning-{v['dir']}.json`."
        )
    lines += [
        "",
        "Load after: the machine's 1-minute load average when the run ended (2 cores; other jobs shared "
        "them). Wall times are comparable only at similar load; CPU time (user + system, of the training and "
        "its evaluations) depends on it less.",
        "",
        f"![{record['env_id']}: greedy eval return against env steps]({record['env']}.png)",
        "",
    ]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for who, runs, color in (
        ("fastdqn", record["fastdqn"]["runs"], "tab:blue"),
        ("SB3 DQN", record["sb3"]["runs"], "tab:orange"),
    ):
        for i, r in enumerate(runs):
            steps, means = zip(*r["evals"])
            ax.plot(
                steps, means, color=color, alpha=0.7, linewidth=1, label=f"{who} ({seeds(runs)})" if i == 0 else None
            )
    zoo = record["rl_zoo"]
    ax.axhline(
        zoo["mean_return"], color="black", linestyle=":", linewidth=1, label=f"rl-zoo DQN {zoo['mean_return']:g}"
    )
    if record["solve_line"] is not None:
        ax.axhline(record["solve_line"], color="grey", linestyle="--", linewidth=0.8, label="solve line")
    ax.set_xlabel("env steps")
    ax.set_ylabel("greedy eval return (10 episodes)")
    ax.set_title(f"{record['env_id']}: one line per seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def index(records: list[dict[str, Any]]) -> str:
    lines = [
        "# Learning results",
        "",
        "Written by `python benchmarks/learning.py` (one page per env). fastdqn: the "
        "median over seeds of the final greedy evaluation (10 episodes) and of the best one along the way. rl-zoo: "
        "the mean return of one trained agent over about 150k env steps of greedy episodes (rl-zoo's benchmark "
        "page calls it one run, a check of maximal performance rather than a quantitative benchmark). Times on "
        "this project's 2-core CPU, shared with other jobs (see each page for the load): CPU time depends on "
        "the load less than wall time.",
        "",
        "| env | rl-zoo DQN | fastdqn final (median) | fastdqn best (median) | seeds | SB3 DQN final (median) | "
        "wall time fastdqn / SB3 (s, median) | CPU time fastdqn / SB3 (s, median) |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    def versus(fd: dict[str, Any], sb3: dict[str, Any], key: str) -> str:
        mine, theirs = fd.get(key), sb3.get(key)
        ratio = f" = {mine / theirs:.2f}x" if mine and theirs else ""
        return f"{fmt(mine)} / {fmt(theirs)}{ratio}"

    for r in records:
        fd, sb3 = r["fastdqn"], r["sb3"]
        sb3_seeds = f" ({seeds(sb3['runs'])})" if sb3["runs"] else ""
        lines.append(
            f"| [{r['env_id']}]({r['env']}.md) | {r['rl_zoo']['mean_return']:g} at "
            f"{r['rl_zoo']['env_steps'] // 1000}k | {fmt(fd['final_median'])} | {fmt(fd.get('best_median'))} | "
            f"{len(fd['runs'])} | {fmt(sb3['final_median'])}{sb3_seeds} | {versus(fd, sb3, 'wall_time_median')} | "
            f"{versus(fd, sb3, 'cpu_time_median')} |"
        )
    missing = [ENVS[name]["config"] for name in ENVS if name not in {r["env"] for r in records}]
    if missing:
        lines.append(f"\nNot run yet: {', '.join(missing)}.")
    lines.append("\nCartPole-v1, the default config: [../cartpole-stability.md](../cartpole-stability.md).")
    lines.append("\nMinAtar (`python benchmarks/minatar_curves.py`): [minatar.md](minatar.md).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="acrobot", help=f"comma-separated, from: {', '.join(ENVS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument("--sb3-python", help="a Python whose venv has stable-baselines3: also run SB3's DQN")
    parser.add_argument("--sb3-only", action="store_true", help="run only the SB3 side (fastdqn runs kept as they are)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run a variant of the configs (into --out/<env>+KEY=VALUE), listed on the env's page",
    )
    parser.add_argument("--report", action="store_true", help="only rebuild the JSON and docs from --out")
    args = parser.parse_args()
    names, changes = args.envs.split(","), parse_set(args.set)
    for name in names:
        if name not in ENVS:
            raise SystemExit(f"unknown env '{name}': choose from {', '.join(ENVS)}")
    if not args.report:
        for name in names:
            out = args.out / variant_dir(name, changes)
            if changes and args.sb3_python:
                raise SystemExit("--sb3-python runs the shipped configs only: drop --set")
            if not args.sb3_only:
                plan = env_plan(name, args.seeds, changes, out)
                if execute(plan, out, BackendSpec(workers=args.workers)) == 130:
                    raise SystemExit(130)
                stamp_load(out, plan)
            if args.sb3_python:
                for seed in args.seeds:
                    run_sb3(name, seed, args.sb3_python, out)
                    print(f"{name} SB3 seed {seed} done", flush=True)
    docs = ROOT / "docs" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    records = []
    for name in ENVS:
        variants = [v for path in sorted(args.out.glob(f"{name}+*")) if (v := build_report(name, path))]
        for v in variants:
            (ROOT / "benchmarks" / "results" / f"learning-{v['dir']}.json").write_text(json.dumps(v, indent=1))
        record = build_report(name, args.out / name)
        if record is None:
            continue
        records.append(record)
        (ROOT / "benchmarks" / "results" / f"learning-{name}.json").write_text(json.dumps(record, indent=1))
        (docs / f"{name}.md").write_text(markdown(record, variants))
        plot(record, docs / f"{name}.png")
        print(markdown(record, variants))
    (docs / "README.md").write_text(index(records))


if __name__ == "__main__":
    main()
