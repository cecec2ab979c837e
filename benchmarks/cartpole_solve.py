"""Seeds table for the default CartPole config: does greedy evaluation reach 475 within 50k env steps, how fast?

    python benchmarks/cartpole_solve.py --seeds 1 2 3 4 5 [--config configs/cartpole.yaml] [--set key=value ...]

Runs each seed as a normal `fastdqn` run (one at a time, so wall times are comparable), then prints a Markdown
table (seed, env steps to the first evaluation >= solved_return, best and final evaluation, wall time, env
steps/s) and writes it with the raw numbers to benchmarks/results/cartpole_solve.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastdqn.api import train
from fastdqn.config import from_dict, load_yaml, parse_set


def run_seed(values: dict, seed: int, root: Path) -> dict:
    cfg = from_dict({**values, "seed": seed})
    result = train(cfg, root / f"seed{seed}", show_progress=False)
    if result.interrupted:  # Ctrl-C / SIGTERM stops the whole table, not just this seed
        raise SystemExit(f"interrupted during seed {seed}")
    return {"seed": seed, "steps_to_solve": result.steps_to_solve,
            "best_eval": max(m for _, m, _ in result.evals), "final_eval": result.final_eval_mean,
            "wall_time": round(result.wall_time, 1), "sps": round(result.sps)}


def markdown(rows: list[dict], solved_return: float) -> str:
    lines = [f"| seed | env steps to eval >= {solved_return:g} | best eval | final eval | wall time (s) | env steps/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        solve = r["steps_to_solve"] if r["steps_to_solve"] is not None else "not reached"
        lines.append(f"| {r['seed']} | {solve} | {r['best_eval']:.1f} | {r['final_eval']:.1f} | "
                     f"{r['wall_time']} | {r['sps']} |")
    solved = sum(r["steps_to_solve"] is not None for r in rows)
    lines.append(f"\nsolved {solved} of {len(rows)} seeds; median wall time "
                 f"{sorted(r['wall_time'] for r in rows)[len(rows) // 2]} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/cartpole_solve.json")
    args = parser.parse_args()
    values = {**load_yaml(args.config), **parse_set(args.set), "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for seed in args.seeds:
            rows.append(run_seed(values, seed, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, from_dict(values).solve_line)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} torch threads",
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                               "config": args.config, "overrides": args.set, "rows": rows, "table": table},
                              indent=2))


if __name__ == "__main__":
    main()
