"""GPU evidence in one run of under 8 minutes: the CUDA tests, the update benchmarks, CartPole training runs (one
agent, and 64 in one process), the MinAtar suite and a Pong run with a fixed wall-clock budget, each stage in its own
process with its own time limit.

    benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--only STAGE,...] [--dry-run]

Built to survive its first contact with a GPU: the machine (torch, GPU, driver, free memory) is printed first, a
stage that fails or runs out of time is recorded (exit code, the end of its log) and the next one starts, and the
JSON `DIR/gpu-check-<time>.json` is rewritten as each stage ends, so a run cut short still leaves every finished
stage's results. Logs, bench JSON and test reports go to `DIR/gpu-check-<time>/`; run dirs (checkpoints) to a
temporary dir, deleted at the end. A stage that reaches its time limit gets SIGINT first (a training run saves
and exits cleanly: the Pong stage ends that way on purpose), then SIGKILL. Stages run in order of value per
second and stop starting once the budget is spent.

`--dry-run` runs the same plumbing with CPU-sized stages (no GPU needed); the test suite runs it, so the script
cannot rot unnoticed. To add a stage, append a `Stage` in `stages()`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the whole check, under the 8 minutes a lent GPU session leaves for a second try
TAIL_LINES = 30  # lines of a failed stage's log kept in the JSON
STOP_GRACE_S = 20  # after SIGINT at its time limit, a stage has this long to save and exit before SIGKILL
KILL_WAIT_S = 5  # and this long to go after SIGKILL


@dataclass
class Stage:
    """One process of the check: `argv` runs from the repository root with at most `timeout_s` seconds.

    `collect(stage_dir, log_text)` turns what the process left behind into the stage's `results`; a stage with
    `stop_ok` (a run with a wall-clock budget) counts as done when it exits cleanly after its time-limit SIGINT.
    It is skipped when less than `min_s` of the budget is left.
    """

    name: str
    argv: list[str]
    timeout_s: float
    collect: Callable[[Path, str], dict[str, Any]] | None = None
    stop_ok: bool = False
    min_s: float = 20
    doc: str = ""


# --- what each stage leaves behind -----------------------------------------------------------------------
def last_json_line(stage_dir: Path, log_text: str) -> dict[str, Any]:
    """The last line of the log that is a JSON object (`fastdqn train --quiet`, `--machine-info`)."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line in the output")


def junit_summary(stage_dir: Path, log_text: str) -> dict[str, Any]:
    """Counts, time and failures of pytest's JUnit XML report."""
    suite = ET.parse(stage_dir / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is not None:
                failed.append({"test": name, "message": (bad.get("message") or "")[:300]})
        if case.find("skipped") is not None:
            skipped.append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
    return {
        **counts,
        "passed": counts["tests"] - sum(counts[k] for k in ("failures", "errors", "skipped")),
        "time_s": float(suite.get("time", 0)),
        "failed": failed,
        "skipped_tests": skipped,
    }


def bench_results(stage_dir: Path, log_text: str) -> dict[str, Any]:
    """The JSON `fastdqn bench` wrote (device, versions, options, every case with its samples)."""
    files = sorted(stage_dir.glob("bench-*.json"))
    if not files:
        raise ValueError("fastdqn bench wrote no JSON")
    return {"file": files[-1].name, **json.loads(files[-1].read_text())}


def minatar_results(path: Path) -> Callable[[Path, str], dict[str, Any]]:
    """Each MinAtar run's frames, speed and evaluations beside the paper's 5M-frame return; the curves stay in the
    benchmark's own JSON (`python benchmarks/minatar_curves.py --plot-only --out JSON --plot PNG` draws them)."""

    def collect(stage_dir: Path, log_text: str) -> dict[str, Any]:
        record = json.loads(path.read_text())
        runs = [
            {k: run[k] for k in ("env_id", "seed", "env_steps", "updates", "sps", "wall_time", "stopped")}
            | {
                "last_eval": run["evals"][-1] if run["evals"] else None,
                "best_eval": max(run["evals"], key=lambda e: e[1]) if run["evals"] else None,
                "published_5M": record["published_5M"][run["game"]],
            }
            for run in record["runs"]
        ]
        return {"file": str(path), "runs": runs}

    return collect


def train_results(run_dir: Path) -> Callable[[Path, str], dict[str, Any]]:
    """A training run's result line, its evaluation curve and its last logged speed, from its run dir."""

    def collect(stage_dir: Path, log_text: str) -> dict[str, Any]:
        records = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [{"step": r["step"], "mean": r["mean"], "std": r["std"]} for r in records if r["kind"] == "eval"]
        train = [r for r in records if r["kind"] == "train"]
        out: dict[str, Any] = {"eval_curve": evals, "train_records": len(train)}
        if train:
            out.update(last_sps=train[-1].get("sps"), last_loss=train[-1].get("loss"))
        try:
            out["result"] = last_json_line(stage_dir, log_text)
        except ValueError:
            out["result"] = None  # killed before it printed one; the curve above is what it left
        return out

    return collect


# --- the stages ------------------------------------------------------------------------------------------
def stages(python: list[str], log_dir: Path, runs: Path, dry: bool) -> list[Stage]:
    """The check's stages in order of value per second; `dry` makes each one CPU-sized."""
    fastdqn = [*python, "-m", "fastdqn"]
    device = ["--device", "cpu" if dry else "cuda"]

    def train(
        name: str,
        flags: list[str],
        dry_flags: list[str],
        timeout_s: float,
        doc: str,
        stop_ok: bool = False,
        min_s: float = 20,
    ) -> Stage:
        run_dir = runs / name
        argv = [
            *fastdqn,
            "train",
            *device,
            "--run-dir",
            str(run_dir),
            "--overwrite",
            "--quiet",
            *(dry_flags if dry else flags),
        ]
        return Stage(name, argv, timeout_s, train_results(run_dir), stop_ok=stop_ok, min_s=min_s, doc=doc)

    def bench(name: str, flags: list[str], dry_flags: list[str], timeout_s: float, doc: str) -> Stage:
        argv = [*fastdqn, "bench", *device, "--out", str(log_dir / name), *(dry_flags if dry else flags)]
        return Stage(name, argv, timeout_s, bench_results, doc=doc)

    def minatar(out: Path, dry: bool) -> Stage:
        argv = [*python, str(ROOT / "benchmarks" / "minatar_curves.py"), "--parallel", *device, "--out", str(out)]
        if dry:
            argv += [
                "--games",
                "Breakout",
                "Asterix",
                "--total-steps",
                "300",
                "--set",
                "learning_starts=100",
                "--set",
                "buffer_size=1000",
                "--set",
                "eval_every=0",
                "--set",
                "eval_episodes=1",
            ]
        else:  # each game in its own process, all on the GPU at once, stopped after 90 s (compile included)
            argv += [
                "--total-steps",
                "5000000",
                "--budget-s",
                "90",
                "--set",
                "compile=true",
                "--set",
                "eval_every=20000",
                "--set",
                "log_every=5000",
            ]
        return Stage(
            "minatar",
            argv,
            90 if dry else 150,
            minatar_results(out),
            min_s=30 if dry else 60,
            doc="the five MinAtar games (configs/minatar.yaml, v1 ids, --compile) at once for 90 s each: "
            "frames, speed and greedy evaluations against the paper's DQN at 5M frames; needs "
            "pip install minatar",
        )

    population = ["--total-steps", "20000", "--eval-every", "0", "--eval-episodes", "2", "--checkpoint-every", "0"]
    cartpole_dry = ["--total-steps", "600", "--learning-starts", "200", "--eval-every", "0", "--eval-episodes", "1"]
    return [
        Stage(
            "machine",
            [*python, str(Path(__file__).resolve()), "--machine-info"],
            60,
            last_json_line,
            doc="torch, CUDA and driver versions, GPU name and free memory",
        ),
        Stage(
            "cuda-tests",
            [
                *python,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "tests/test_cuda.py",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={log_dir / 'cuda-tests' / 'junit.xml'}",
            ],
            60 if dry else 210,
            junit_summary,
            doc="pytest -m cuda: captured/compiled/bf16 parity, "
            "recapture, failed capture, staging, frame replay capture, CartPole learning on CUDA",
        ),
        bench(
            "bench-update",
            ["--suite", "update-mlp,update-cnn,replay", "--rounds", "5", "--iters", "100", "--warmup", "10"],
            ["--suite", "update-mlp,replay", "--variants", "eager", "--rounds", "1", "--iters", "2", "--warmup", "0"],
            60 if dry else 150,
            doc="update step per variant (eager, compiled, compiled+amp, cuda-graph), MLP and CNN; replay calls",
        ),
        train(
            "cartpole-default",
            ["--total-steps", "50000"],
            cartpole_dry,
            60 if dry else 90,
            doc="the default CartPole config to 50k env steps: wall time and eval curve",
        ),
        train(
            "cartpole-16envs-compile-amp",
            ["--envs", "16", "--compile", "--amp", "--total-steps", "50000"],
            ["--envs", "16", "--amp", *cartpole_dry],
            60 if dry else 120,
            doc="--envs 16 --compile --amp to 50k env steps (CUDA graph on): wall time, compile included",
        ),
        *(
            train(
                f"population-{k}",
                ["--agents", str(k), *population],
                ["--agents", str(min(k, 2)), *cartpole_dry],
                60 if dry else 120,
                doc=f"{k} CartPole agent(s) of the default config in one process (--agents {k}), 20k env steps "
                "each, the final evaluation only: the population's wall time against one agent's",
            )
            for k in (1, 64)
        ),
        minatar(log_dir / "minatar" / "minatar-gpu.json", dry),
        bench(
            "bench-e2e",
            ["--suite", "e2e", "--steps", "4000", "--learning-starts", "1000", "--repeats", "1", "--envs", "1,16"],
            ["--suite", "e2e", "--envs", "1", "--steps", "300", "--learning-starts", "100", "--repeats", "1"],
            60 if dry else 90,
            doc="whole training runs, each a new process: 1 and 16 envs (the CleanRL suite "
            "needs CleanRL's own environment, see docs/performance.md)",
        ),
        train(
            "pong",
            [
                "--env",
                "ALE/Pong-v5",
                "--compile",
                "--amp",
                "--learning-starts",
                "20000",
                "--eval-every",
                "50000",
                "--eval-episodes",
                "3",
                "--checkpoint-every",
                "0",
            ],
            [
                "--env",
                "ALE/Pong-v5",
                "--buffer-size",
                "2000",
                "--learning-starts",
                "200",
                "--eval-every",
                "400",
                "--eval-episodes",
                "1",
                "--max-episode-steps",
                "200",
                "--checkpoint-every",
                "0",
            ],
            25 if dry else 150,
            stop_ok=True,
            min_s=10 if dry else 40,
            doc="Pong with compile, amp and the CUDA graph for a fixed wall-clock budget, stopped by SIGINT: "
            "speed and eval curve",
        ),
    ]


# --- running them ----------------------------------------------------------------------------------------
def write_json(path: Path, record: dict[str, Any]) -> None:
    """Replace the JSON atomically: a kill mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []


def run_stage(stage: Stage, log_dir: Path, limit_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one stage in its own process group, its stdout and stderr into its log; stop it at `limit_s` (SIGINT,
    then SIGKILL) or when the driver itself is interrupted; record how it went and what it left behind."""
    stage_dir = log_dir / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage.name}.log"
    out = {
        "name": stage.name,
        "doc": stage.doc,
        "command": stage.argv,
        "limit_s": round(limit_s, 1),
        "log": str(log.relative_to(log_dir.parent)),
    }
    print(f"[gpu-check] {stage.name}: up to {limit_s:.0f} s: {' '.join(stage.argv)}", flush=True)
    start = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            stage.argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )  # the driver decides when a stage is interrupted
        try:
            proc.wait(limit_s)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop(proc)
            status = "stopped" if stage.stop_ok and proc.returncode == 0 else "timeout"
        except KeyboardInterrupt:
            stop(proc)
            status = "interrupted"
    out.update(status=status, returncode=proc.returncode, wall_s=round(time.monotonic() - start, 1))
    text = log.read_text(errors="replace")
    if status not in ("ok", "stopped"):
        out["tail"] = text.splitlines()[-TAIL_LINES:]
    if stage.collect is not None:
        try:
            out["results"] = stage.collect(stage_dir, text)
        except Exception as exc:  # a stage that left nothing readable is still recorded
            out["results_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(f"[gpu-check] {stage.name}: {status} after {out['wall_s']} s", flush=True)
    for line in out.get("tail", [])[-10:]:
        print(f"[gpu-check]   | {line}", flush=True)
    return out


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the stage's process group (fastdqn saves and exits), SIGKILL if it is still there after the grace."""
    for sig, wait_s in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def machine_info() -> dict[str, Any]:
    """What the results were measured on; printed first, so a broken GPU shows before anything runs."""
    import platform
    import shutil

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            info["gpus"].append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": list(torch.cuda.get_device_capability(i)),
                    "free_gb": round(free / 1e9, 2),
                    "total_gb": round(total / 1e9, 2),
                }
            )
    if shutil.which("nvidia-smi"):
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.free,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = query.stdout.strip().splitlines()
    return info


def main(argv: list[str] | None = None, make_stages: Callable[..., list[Stage]] = stages) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for JSON and logs")
    parser.add_argument(
        "--budget", type=float, default=None, help=f"seconds for all stages (default {BUDGET_S}; dry run: 300)"
    )
    parser.add_argument("--only", help="comma list of stage names to run (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized stages: the plumbing, on any machine")
    parser.add_argument("--machine-info", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.machine_info:
        info = machine_info()
        for key, value in info.items():
            print(f"{key}: {value}", file=sys.stderr)
        print(json.dumps(info))
        return 0

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out).resolve()
    log_dir = out / f"gpu-check-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = out / f"gpu-check-{stamp}.json"
    budget = args.budget if args.budget is not None else (300 if args.dry_run else BUDGET_S)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    record: dict[str, Any] = {
        "started": stamp,
        "dry_run": args.dry_run,
        "budget_s": budget,
        "root": str(ROOT),
        "stages": [],
        "finished": False,
    }
    began = time.monotonic()
    deadline = began + budget
    with tempfile.TemporaryDirectory(prefix="gpu-check-runs-") as runs:
        chosen = make_stages([sys.executable], log_dir, Path(runs), args.dry_run)
        if args.only:
            names = set(args.only.split(","))
            unknown = names - {s.name for s in chosen}
            if unknown:
                parser.error(
                    f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(s.name for s in chosen)}"
                )
            chosen = [s for s in chosen if s.name in names]
        write_json(json_path, record)
        for stage in chosen:
            # a stage stopped at its limit may take the grace and the kill wait on top: keep them in the budget
            left = deadline - time.monotonic() - STOP_GRACE_S - KILL_WAIT_S
            if left < stage.min_s:
                record["stages"].append(
                    {
                        "name": stage.name,
                        "doc": stage.doc,
                        "status": "skipped",
                        "reason": f"{max(left, 0):.0f} s of the budget left, needs {stage.min_s:.0f}",
                    }
                )
            else:
                record["stages"].append(run_stage(stage, log_dir, min(stage.timeout_s, left), env))
                if stage.name == "machine" and "results" in record["stages"][-1]:
                    record["machine"] = record["stages"][-1]["results"]
                    print(f"[gpu-check] machine: {json.dumps(record['machine'])}", flush=True)
            record["elapsed_s"] = round(time.monotonic() - began, 1)
            write_json(json_path, record)  # after every stage: a run cut short keeps what it measured
            if record["stages"][-1]["status"] == "interrupted":
                print(f"[gpu-check] interrupted; results so far in {json_path}", flush=True)
                return 130
    record["finished"] = True
    write_json(json_path, record)
    statuses = {s["name"]: s["status"] for s in record["stages"]}
    print(f"[gpu-check] {statuses}; results in {json_path}", flush=True)
    return 0 if all(v in ("ok", "stopped") for v in statuses.values()) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` and job control stop it like Ctrl-C
    sys.exit(main())
