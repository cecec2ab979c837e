"""A TPE sweep of CartPole-v1, on the local backend and on a local Ray cluster: tables, wall times, pruned runs.

    python benchmarks/sweep_ray.py [--trials 12] [--cpus 2] [--out benchmarks/results/sweep_ray.json]

Runs the same `fastdqn sweep --search tpe` twice, each as its own process as a user would: with `--workers N` on
this machine, then with `--backend ray` on a Ray cluster of one node with N CPUs that this script starts with
`ray start --head` (listening on 127.0.0.2, a loopback address, and stopped at the end). Writes both results
tables, the sweep wall times (the Ray cluster's start-up is timed apart), how busy each kept its N slots (the
runs' own wall times summed, over N x the sweep's wall time), the pruned counts and the machine's load around
each sweep to the JSON file, and prints a summary. TPE picks points from the trials that ended before, so the
two sweeps try different points when their runs end in a different order.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.2"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # loopback only: no token needed
SPACE = ["learning_rate=3e-4:1e-2", "batch_size=32,64,128", "target_update_interval=int:64:2048"]
SETS = ["total_steps=20000", "eval_every=2500", "eval_episodes=5", "device=cpu"]


def sweep_command(args: argparse.Namespace, out: Path, backend: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fastdqn.cli",
        "sweep",
        "--config",
        args.config,
        "--grid",
        *SPACE,
        "--search",
        "tpe",
        "--trials",
        str(args.trials),
        "--pruner",
        "median",
        "--startup-trials",
        str(args.startup_trials),
        "--search-seed",
        str(args.search_seed),
        "--metric",
        "auc",
        "--out",
        str(out),
        *backend,
        *(f"--set={s}" for s in SETS),
    ]


def timed_sweep(command: list[str], out: Path, slots: int) -> dict:
    """Run one sweep; its wall time, the machine's load around it, and how busy it kept its `slots`."""
    load_before, start = os.getloadavg()[0], time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True, env={**os.environ, **RAY_ENV})
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((out / "results.csv").open()))
    runs = sum(float(r["wall time (s)"]) for r in rows)  # each run's own training time, summed
    return {
        "command": " ".join(command[2:]),
        "sweep_wall_time_s": round(wall, 1),
        "trials": len(rows),
        "pruned": sum(r["status"].startswith("pruned") for r in rows),
        "finished": sum(r["status"] == "done" for r in rows),
        "run_time_sum_s": round(runs, 1),
        "busy": round(runs / (slots * wall), 3),  # share of the sweep's slot-seconds spent inside runs
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "best": rows[0],
        "table": (out / "results.md").read_text(),
    }


def start_ray(cpus: int, temp: Path) -> tuple[subprocess.Popen, str, float]:
    """A one-node Ray cluster (`ray start --head --block`), its address and how long it took to start."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            str(cpus),
            "--node-ip-address",
            HOST,
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
        ],
        stdout=(temp / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **RAY_ENV},
    )
    probe = (
        f"import ray; ray.init(address='{HOST}:{port}', logging_level='ERROR'); "
        f"assert ray.cluster_resources().get('CPU') == {cpus}"
    )
    while subprocess.run([sys.executable, "-c", probe], capture_output=True, env={**os.environ, **RAY_ENV}).returncode:
        if head.poll() is not None or time.perf_counter() - start > 300:
            raise SystemExit(f"the Ray cluster did not start: see {temp / 'head.log'}")
        time.sleep(1)
    return head, f"{HOST}:{port}", round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--startup-trials", type=int, default=4)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=2, help="local workers, and the Ray cluster's CPUs (1 a run)")
    parser.add_argument("--out", default="benchmarks/results/sweep_ray.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sweep_ray", dir="/tmp") as tmp:  # short: Ray's socket paths
        root = Path(tmp)
        local_cmd = sweep_command(args, root / "local", ["--workers", str(args.cpus)])
        local = timed_sweep(local_cmd, root / "local", args.cpus)
        print(f"local: {local['sweep_wall_time_s']} s, {local['pruned']} of {local['trials']} pruned", flush=True)
        (root / "ray-temp").mkdir()
        head, address, ray_start = start_ray(args.cpus, root / "ray-temp")
        try:
            ray_cmd = sweep_command(args, root / "ray", ["--backend", "ray", "--address", address])
            on_ray = timed_sweep(ray_cmd, root / "ray", args.cpus)
        finally:
            head.terminate()
            head.wait(120)
        on_ray["cluster_start_s"] = ray_start
        print(
            f"ray: {on_ray['sweep_wall_time_s']} s (+{ray_start} s to start the cluster), {on_ray['pruned']} of "
            f"{on_ray['trials']} pruned",
            flush=True,
        )
    import optuna
    import ray
    import torch

    from fastdqn.bench import cpu_name

    record = {
        "machine": f"{platform.node()} {cpu_name()}, {os.cpu_count()} CPUs",
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "ray_version": ray.__version__,
        "optuna": optuna.__version__,
        "config": args.config,
        "sets": SETS,
        "space": SPACE,
        "trials": args.trials,
        "startup_trials": args.startup_trials,
        "search_seed": args.search_seed,
        "cpus": args.cpus,
        "local": local,
        "ray": on_ray,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(on_ray["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
