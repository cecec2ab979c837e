"""The DQN ablation (seven rows x seeds) trained two ways, each a whole `fastdqn ablate` process: every seed a run
of its own (`--separate-runs`, `--workers` processes at a time), and each variant's seeds as one population.

    python benchmarks/ablation_populations.py --seeds 5 --workers 2 --out runs/ablation-populations

Writes benchmarks/results/ablation_populations.json: the wall time of each command (start-up, every run, the
report), its results table, and the ratio. Both train the same rows (the default CartPole config under the
ablation's full-DQN base, `fastdqn.plans`) and the same seeds; the two commands run one after the other, so compare
them only from one run of this script on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT_JSON = Path("benchmarks/results/ablation_populations.json")


def ablate(out: Path, seeds: int, workers: int, extra: list[str]) -> dict:
    """Run one `fastdqn ablate` from scratch in `out`; its wall time and results table."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "fastdqn", "ablate", "--seeds", str(seeds), "--workers", str(workers)]
    argv += ["--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    text = " ".join((done.stdout + done.stderr).split())
    first = text[text.find("fastdqn ablate:") : text.find("(stop with")].strip()  # the plan line
    return {"command": argv[1:], "wall_s": round(wall, 1), "plan": first, "table": (out / "results.md").read_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-populations"))
    parser.add_argument("--json", type=Path, default=OUT_JSON)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to both commands")
    args = parser.parse_args()
    extra = [item for kv in args.set for item in ("--set", kv)]
    separate = ablate(args.out / "separate", args.seeds, args.workers, ["--separate-runs", *extra])
    populations = ablate(args.out / "populations", args.seeds, args.workers, extra)
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": args.seeds,
        "workers": args.workers,
        "separate_runs": separate,
        "populations": populations,
        "speedup": round(separate["wall_s"] / populations["wall_s"], 2),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(f"separate runs {separate['wall_s']} s, populations {populations['wall_s']} s: {record['speedup']}x")


if __name__ == "__main__":
    main()
