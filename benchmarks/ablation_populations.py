"""The DQN ablation (seven rows x seeds) trained two ways, each a whole `fastdqn ablate` process: every seed a run
of its own (`--separate-runs`, `--workers` processes at a time), and each variant's seeds as one population.

    python benchmarks/ablation_populations.py --seeds 5 --workers 2 --out runs/ablation-populations [--baseline REV]

Writes benchmarks/results/ablation_populations.json: the wall time of each command (start-up, every run, the
report), its results table, and the ratio. Both train the same rows (the default CartPole config under the
ablation's full-DQN base, `fastdqn.plans`) and the same seeds; the two commands run one after the other, so compare
them only from one run of this script on an otherwise idle machine. With `--baseline REV`, first the same
`fastdqn ablate --seeds S --workers W` as the code at git revision REV runs it (a worktree of this repository,
imported ahead of the installed fastdqn; every seed a run of its own, as before populations existed), so the
ablation's speed-up over an earlier state of the project is measured on this machine in the same hour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdqn.bench import cpu_name

OUT_JSON = Path("benchmarks/results/ablation_populations.json")
ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fastdqn"]
# The CLI of an earlier revision, which may have had no `python -m fastdqn`
OLD_CLI = [sys.executable, "-c", "import sys; from fastdqn.cli import main; sys.exit(main())"]


def ablate(
    out: Path, seeds: int, workers: int, extra: list[str], cli: list[str] = CLI, tree: Path | None = None
) -> dict:
    """Run one `fastdqn ablate` from scratch in `out` (`cli`: how the command is started; `tree`: a checkout whose
    fastdqn it imports, ahead of the installed one); its wall time and results table."""
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    argv = [*cli, "ablate", "--seeds", str(seeds), "--workers", str(workers), "--out", str(out), *extra]
    start = time.perf_counter()
    # in `tree`: `python -c` puts the working directory first on the import path, and PYTHONPATH comes next for the
    # command and the worker processes it spawns
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    text = " ".join((done.stdout + done.stderr).split())
    first = text[text.find("fastdqn ablate:") : text.find("(stop with")].strip()  # the plan line
    return {"command": argv[1:], "wall_s": round(wall, 1), "plan": first, "table": (out / "results.md").read_text()}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def baseline(rev: str, out: Path, seeds: int, workers: int, extra: list[str]) -> dict:
    """`fastdqn ablate` as the code at revision `rev` runs it (from a temporary worktree, ahead of the installed
    fastdqn on the import path of the command and its worker processes)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(tree), commit)
        try:
            result = ablate(out, seeds, workers, extra, OLD_CLI, tree)
        finally:
            git("worktree", "remove", "--force", str(tree))
    if "populations" in result["plan"]:
        raise SystemExit(f"the baseline ran this checkout's fastdqn, not {rev}'s: {result['plan']}")
    return {"commit": commit, "commit_date": git("show", "-s", "--format=%cI", commit), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-populations"))
    parser.add_argument("--json", type=Path, default=OUT_JSON)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every command")
    parser.add_argument("--baseline", metavar="REV", help="also time the ablation as the code at this revision runs it")
    args = parser.parse_args()
    extra = [item for kv in args.set for item in ("--set", kv)]
    before = baseline(args.baseline, args.out / "baseline", args.seeds, args.workers, extra) if args.baseline else None
    separate = ablate(args.out / "separate", args.seeds, args.workers, ["--separate-runs", *extra])
    populations = ablate(args.out / "populations", args.seeds, args.workers, extra)
    record = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": args.seeds,
        "workers": args.workers,
        "separate_runs": separate,
        "populations": populations,
        "speedup": round(separate["wall_s"] / populations["wall_s"], 2),
    }
    if before is not None:
        record["baseline"] = before
        record["speedup_over_baseline"] = round(before["wall_s"] / populations["wall_s"], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(f"separate runs {separate['wall_s']} s, populations {populations['wall_s']} s: {record['speedup']}x")
    if before is not None:
        print(f"baseline {before['commit'][:7]} {before['wall_s']} s: {record['speedup_over_baseline']}x")


if __name__ == "__main__":
    main()
