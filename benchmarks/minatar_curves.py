"""MinAtar learning curves of fastdqn's DQN (configs/minatar.yaml) beside the paper's: each game's greedy evaluations
and training-episode returns, and the DQN returns Young & Tian (2019) published at 5M frames.

    python benchmarks/minatar_curves.py --games Breakout SpaceInvaders --total-steps 300000 [--seeds 1 2] [--parallel]
        [--device cpu] [--budget-s SECONDS] [--set key=value ...] [--out JSON] [--plot PNG] [--page MD]
    python benchmarks/minatar_curves.py --plot-only --out JSON --plot PNG [--page MD]   # redraw from a JSON

Each (game, seed) is a normal fastdqn run (`fastdqn.train`), one after the other or, with --parallel, each in its
own process. --budget-s stops a run at that wall time with the SIGINT Ctrl-C sends: the run saves and ends
cleanly, and its curve so far is kept. The JSON (machine, load, config, every run's curves) is rewritten after
each run. The published numbers are at 5M frames; a CPU run reaches a small fraction of that, and the figure
says how many frames each curve has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
# DQN at 5M frames, read off the learning curves of Young & Tian (2019), "MinAtar: An Atari-Inspired Testbed for
# Thorough and Reproducible Reinforcement Learning Experiments": the mean return of training episodes (epsilon 0.1).
PUBLISHED_5M = {"Asterix": 17, "Breakout": 10, "Freeway": 50, "Seaquest": 20, "SpaceInvaders": 43}


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Replace the JSON atomically: a kill mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def curves(run_dir: Path) -> dict[str, list]:
    """A run's greedy evaluations [step, mean, std] and training returns [step, mean of the last 20 training
    episodes, episodes so far] from its metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {
        "evals": [[r["step"], r["mean"], r["std"]] for r in records if r["kind"] == "eval"],
        "train_returns": [
            [r["step"], r["recent_return"], r["episodes"]]
            for r in records
            if r["kind"] == "train" and r.get("recent_return") is not None
        ],
    }


class Budget:
    """SIGINT to this process after `seconds` (None: never), and whether it was this timer that sent it."""

    def __init__(self, seconds: float | None):
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire) if seconds else None

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> Budget:
        if self.timer is not None:
            self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()


def run_game(
    game: str, version: str, seed: int, values: dict[str, Any], budget_s: float | None, runs: Path
) -> dict[str, Any]:
    """Train one game and seed with `values` (config keys); its curves and how the run went."""
    from fastdqn.api import train
    from fastdqn.config import from_dict

    cfg = from_dict({**values, "env_id": f"MinAtar/{game}-{version}", "seed": seed})
    run_dir = runs / f"{game}-s{seed}"
    with Budget(budget_s) as budget:
        result = train(cfg, run_dir, overwrite=True, show_progress=False)
    stopped = ("budget" if budget.fired else "interrupt") if result.interrupted else None
    return {
        "game": game,
        "env_id": cfg.env_id,
        "seed": seed,
        "env_steps": result.env_steps,
        "updates": result.updates,
        "episodes": result.episodes,
        "wall_time": round(result.wall_time, 1),
        "sps": round(result.sps, 1),
        "stopped": stopped,
        **curves(run_dir),
    }


def run_children(args: argparse.Namespace, jobs: list[tuple[str, int]], tmp: Path) -> list[dict[str, Any]]:
    """Each (game, seed) in its own process of this script, all at once; their runs, in the order of `jobs`. A
    SIGINT here is passed on: each run saves and ends, and its curve so far is kept."""
    procs = []
    for game, seed in jobs:
        out = tmp / f"{game}-{seed}.json"
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--games",
            game,
            "--seeds",
            str(seed),
            "--config",
            args.config,
            "--version",
            args.version,
            "--total-steps",
            str(args.total_steps),
            "--device",
            args.device,
            "--runs-root",
            args.runs_root or str(tmp / "runs"),
            "--out",
            str(out),
            *(["--budget-s", str(args.budget_s)] if args.budget_s else []),
            *(item for pair in (("--set", s) for s in args.set) for item in pair),
        ]
        procs.append((out, subprocess.Popen(argv, cwd=ROOT)))
    runs = []
    for out, proc in procs:
        while proc.poll() is None:
            try:
                proc.wait()
            except KeyboardInterrupt:
                for _, other in procs:
                    other.send_signal(signal.SIGINT)
        if out.is_file():
            runs += json.loads(out.read_text())["runs"]
    return runs


def machine(device: str) -> dict[str, Any]:
    """What the curves were measured on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": gpu,
    }


def plot(record: dict[str, Any], path: Path) -> None:
    """One panel per game: greedy evaluations (mean +- std), training returns, and the paper's 5M-frame return."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = [g for g in GAMES if any(r["game"] == g for r in record["runs"])]
    fig, axes = plt.subplots(1, len(games), figsize=(4.2 * len(games), 3.6), squeeze=False)
    for ax, game in zip(axes[0], games):
        for i, run in enumerate(r for r in record["runs"] if r["game"] == game):
            color = f"C{i}"
            if run["train_returns"]:
                steps, returns, _ = zip(*run["train_returns"])
                ax.plot(steps, returns, color=color, alpha=0.5, lw=1, label=f"training episodes, seed {run['seed']}")
            if run["evals"]:
                steps, means, stds = zip(*run["evals"])
                ax.errorbar(
                    steps,
                    means,
                    yerr=stds,
                    color=color,
                    marker="o",
                    ms=3,
                    capsize=2,
                    lw=1.5,
                    label=f"greedy eval, seed {run['seed']}",
                )
        ax.axhline(PUBLISHED_5M[game], color="k", ls="--", lw=1)
        ax.text(
            0.02,
            PUBLISHED_5M[game],
            f"paper's DQN at 5M frames: {PUBLISHED_5M[game]}",
            va="bottom",
            fontsize=8,
            transform=ax.get_yaxis_transform(),
        )
        frames = max(r["env_steps"] for r in record["runs"] if r["game"] == game)
        ax.set_title(f"MinAtar/{game}: {frames / 1e3:,.0f}k of 5M frames", fontsize=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("env steps (= frames)")
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.9))
    where = record["machine"].get("cuda") or f"{record['machine']['cpu_count']}-core CPU (shared)"
    fig.suptitle(
        f"fastdqn DQN, configs/minatar.yaml, on {where}; dashed: Young & Tian (2019) at 5M frames", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def page(record: dict[str, Any], json_path: Path, plot_path: Path | None, path: Path) -> None:
    """A Markdown page of the runs in `record`: each run's frames, last and best greedy evaluation and last
    training return beside the paper's 5M-frame return, and the figure."""
    rows = [
        "| game | seed | env steps (frames) | of 5M | wall time (s) | last greedy eval | best greedy eval | "
        "last training return | paper's DQN at 5M |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in record["runs"]:
        last = f"{run['evals'][-1][1]:.1f} at {run['evals'][-1][0]:,}" if run["evals"] else "-"
        best = max(run["evals"], key=lambda e: e[1]) if run["evals"] else None
        train_last = run["train_returns"][-1][1] if run["train_returns"] else None
        rows.append(
            f"| {run['env_id']} | {run['seed']} | {run['env_steps']:,} | {run['env_steps'] / 5e6:.1%} | "
            f"{run['wall_time']:.0f} | {last} | {'-' if best is None else f'{best[1]:.1f} at {best[0]:,}'} "
            f"| {'-' if train_last is None else f'{train_last:.1f}'} | {record['published_5M'][run['game']]} |"
        )
    where = record["machine"].get("cuda") or f"{record['machine']['cpu_count']}-core CPU, shared"
    load = ", ".join(f"{x:.1f}" for x in record["load_average_start"])
    load_end = ", ".join(f"{x:.1f}" for x in record.get("load_average_end", []))
    lines = [
        "# MinAtar",
        "",
        f"`python benchmarks/{record['command']}` on {record['date']} ({where}; torch {record['machine']['torch']}; "
        f"load average {load} at the start, {load_end} at the end), {record['config']} with "
        f"{', '.join(record['overrides']) or 'no changes'}. Raw numbers and every curve: "
        f"`{json_path}`.",
        "",
        "Greedy eval: the mean return of an evaluation's episodes with epsilon 0 (MinAtar's sticky actions keep "
        "them stochastic). "
        "Training return: the mean of the last 20 training episodes (epsilon 0.1 after the first 100k env "
        "steps), the measure the paper plots. The paper's numbers (Young & Tian 2019, DQN, read off its curves) "
        "are at 5M frames; these runs are a small fraction of that, so they show where learning starts, "
        "not where it ends.",
        "",
        *rows,
    ]
    if plot_path is not None:
        lines += ["", f"![MinAtar learning curves]({os.path.relpath(plot_path, path.parent)})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", default=list(GAMES), choices=GAMES)
    parser.add_argument("--version", default="v1", choices=["v0", "v1"], help="v1: each game's own actions")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--total-steps", type=int, default=300_000)
    parser.add_argument("--config", default="configs/minatar.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time limit of each run")
    parser.add_argument("--parallel", action="store_true", help="every (game, seed) in its own process at once")
    parser.add_argument("--runs-root", default=None, help="where the run dirs go (default: a temporary dir)")
    parser.add_argument("--out", default="benchmarks/results/minatar-cpu.json")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    parser.add_argument("--page", default=None, help="write a Markdown page of the runs here")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot (and --page) from --out, train nothing")
    return parser


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys every run of this benchmark shares: the config file, --set items, steps and device."""
    from fastdqn.config import load_yaml, parse_set

    return {
        **load_yaml(ROOT / args.config),
        **parse_set(args.set),
        "total_steps": args.total_steps,
        "device": args.device,
    }


def main() -> None:
    args = build_parser().parse_args()
    out = Path(args.out)
    if args.plot_only:
        record = json.loads(out.read_text())
        plot(record, Path(args.plot))
        if args.page:
            page(record, out, Path(args.plot), Path(args.page))
        return

    values = config_values(args)
    record: dict[str, Any] = {
        "what": "fastdqn DQN on MinAtar against the paper's DQN at 5M frames",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(args.device),
        "load_average_start": os.getloadavg(),
        "config": args.config,
        "overrides": args.set,
        "total_steps": args.total_steps,
        "budget_s": args.budget_s,
        "published_5M": PUBLISHED_5M,
        "published_source": "Young & Tian (2019), DQN curves read at 5M frames (training returns, epsilon 0.1)",
        "runs": [],
    }
    jobs = [(game, seed) for game in args.games for seed in args.seeds]
    with tempfile.TemporaryDirectory(prefix="minatar-") as tmp:
        runs = Path(args.runs_root) if args.runs_root else Path(tmp)
        if args.parallel and len(jobs) > 1:
            record["runs"] = run_children(args, jobs, Path(tmp))
        else:
            for game, seed in jobs:
                record["runs"].append(run_game(game, args.version, seed, values, args.budget_s, runs))
                record["load_average_end"] = os.getloadavg()
                write_json(out, record)
                print(
                    json.dumps({k: v for k, v in record["runs"][-1].items() if k not in ("evals", "train_returns")}),
                    flush=True,
                )
                if record["runs"][-1]["stopped"] == "interrupt":  # Ctrl-C stops the whole benchmark
                    break
    record["load_average_end"] = os.getloadavg()
    write_json(out, record)
    if args.plot:
        plot(record, Path(args.plot))
    if args.page:
        page(record, out, Path(args.plot) if args.plot else None, Path(args.page))


if __name__ == "__main__":
    main()
