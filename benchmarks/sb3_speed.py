"""fastdqn against Stable-Baselines3's DQN at the same hyperparameters: whole processes, one after the other, on one
machine in one command (benchmarks/learning.py has the learning side, over 5 seeds, under whatever load there was).

    python benchmarks/sb3_speed.py --sb3-python /path/to/sb3-venv/bin/python [--env acrobot] [--seed 1] [--rounds 1]

Each round runs the env's config (configs/<env>.yaml, one torch thread on the CPU, as learning.py runs it) with
Double DQN off, since SB3's DQN has none, as `fastdqn train --quiet`, then SB3's DQN with the same hyperparameters
(benchmarks/sb3_dqn.py, as learning.py runs it: one torch thread, the same evaluations). Both are timed here from
start to exit, imports and evaluations included; CPU time is the child's user + system time. Keys SB3's DQN has no
equivalent for are listed in the JSON. Writes benchmarks/results/sb3_speed-<env>.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fastdqn.bench import cpu_name
from learning import ENVS, env_config, sb3_command, sb3_hyperparams

RESULTS = Path(__file__).resolve().parent / "results"


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of a process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.stdout


def one_round(name: str, seed: int, sb3_python: str, tmp: Path) -> dict[str, dict[str, float]]:
    """fastdqn's run, then SB3's, of the env's config at `seed`: wall and CPU seconds and the final evaluation."""
    cfg = env_config(name, {"double_dqn": False, "seed": seed})
    config = tmp / f"{name}-{seed}.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp / f"fastdqn-{seed}-{time.monotonic_ns()}"
    wall, cpu, out = timed(
        [sys.executable, "-m", "fastdqn", "train", "--config", str(config), "--run-dir", str(run_dir), "--quiet"]
    )
    result = json.loads(out.strip().splitlines()[-1])
    fastdqn = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "final_eval": result["final_eval_mean"]}
    sb3_out = tmp / f"sb3-{seed}-{time.monotonic_ns()}.json"
    wall, cpu, _ = timed(sb3_command(name, seed, sb3_python, sb3_out))
    sb3 = {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "final_eval": json.loads(sb3_out.read_text())["final_eval"],
    }
    return {"fastdqn": fastdqn, "sb3": sb3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sb3-python", required=True, help="a Python whose venv has stable-baselines3")
    parser.add_argument("--env", default="acrobot", choices=sorted(ENVS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    opts = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            rounds.append(one_round(opts.env, opts.seed, opts.sb3_python, Path(tmp)))
            print(f"round {r + 1}: {json.dumps(rounds[-1])}", flush=True)
    walls = {who: statistics.median(r[who]["wall_s"] for r in rounds) for who in ("fastdqn", "sb3")}
    cfg = env_config(opts.env, {"double_dqn": False})
    record = {
        "command": "python benchmarks/sb3_speed.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "python": sys.version.split()[0]},
        "env": cfg.env_id,
        "config": ENVS[opts.env]["config"],
        "changes": ["double_dqn=false"],
        "sb3_unmatched": sb3_hyperparams(cfg)[1],
        "rounds": rounds,
        "median_wall_s": walls,
        "fastdqn_wall_over_sb3": round(walls["fastdqn"] / walls["sb3"], 3),
    }
    out = RESULTS / f"sb3_speed-{opts.env}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{cfg.env_id}: fastdqn {walls['fastdqn']:.1f} s, SB3 {walls['sb3']:.1f} s, {record['fastdqn_wall_over_sb3']}x"
    )


if __name__ == "__main__":
    main()
