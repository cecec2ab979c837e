"""Whole training runs for `fastdqn bench`, each in a process of its own: fastdqn's command and CleanRL's dqn.py.

Every run is a new process started from a clean slate: its own interpreter, imports, torch threads, RNG and,
for fastdqn, a fresh, empty TorchInductor cache directory (a compiled run pays its whole compile, as a user's
first run does), unless --compile-cache warm asks for a case whose runs keep theirs. Nothing one case sets can
reach the next. The cases of a suite take turns (A B C A B C ...), so load from
other processes falls on all of them alike. Per run (`RUN_FIELDS`):

- whole_s: wall-clock seconds from starting the process to its exit, measured here;
- cpu_s: CPU seconds of the process and its children (resource.getrusage of waited-for children);
- first_update_s: fastdqn reports it (`TrainResult.first_update_time`, from the OS's process start time);
  for CleanRL it is when its first `SPS:` line reaches us (it prints one in each update at a multiple of 100
  env steps, so this is at most 100 env steps after its first update: 90 with learning_starts 10,000;
  PYTHONUNBUFFERED=1 makes its lines arrive as printed);
- steady_sps: fastdqn reports it (`TrainResult.steady_sps`); for CleanRL it comes from its own SPS lines: line
  k is printed at env step s_k with SPS_k = int(s_k / t_k), t_k seconds since its loop began, so the rate
  between its first and last line is (s_last - s_first) / (t_last - t_first) on its own clock;
- reported_sps: fastdqn's env steps / loop time (TrainResult.sps), CleanRL's last SPS line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fastdqn.bench_cases import TRAIN_VARIANTS, TrainingCase
from fastdqn.config import Config
from fastdqn.errors import ConfigError, FastDQNError
from fastdqn.logs import console

# CleanRL dqn.py's defaults (its Args), which fastdqn's side of the comparison copies.
CLEANRL_DQN = {
    "hidden_sizes": [120, 84],
    "batch_size": 128,
    "train_every": 10,
    "gradient_steps": 1,
    "loss": "mse",
    "double_dqn": False,
    "max_grad_norm": 0.0,
    "learning_rate": 2.5e-4,
    "buffer_size": 10_000,
    "target_update_interval": 500,
    "gamma": 0.99,
    "epsilon_start": 1.0,
    "epsilon_end": 0.05,
    "seed": 1,
    "n_step": 1,
    "lr_schedule": "constant",
}
CLEANRL_SPS_EVERY = 100  # dqn.py prints "SPS: <int>" in each update at an env step that is a multiple of this
SPS_LINE = re.compile(r"^SPS: (\d+)\s*$")
PROBE = (
    "import json, sys, numpy, torch, gymnasium; print(json.dumps({'python': sys.version.split()[0], "
    "'torch': torch.__version__, 'gymnasium': gymnasium.__version__, 'numpy': numpy.__version__, "
    "'torch_threads': torch.get_num_threads(), 'cuda': torch.cuda.is_available()}))"
)


class BenchError(FastDQNError):
    """A benchmarked process failed or printed something the bench cannot read."""


@dataclass
class Finished:
    """What one process did: its stdout lines with their arrival times, exit code, wall and CPU seconds."""

    lines: list[tuple[float, str]]
    returncode: int
    whole_s: float
    cpu_s: float
    stderr: str


def run_process(argv: list[str], cwd: Path, env: dict[str, str]) -> Finished:
    """Start `argv` and read its stdout line by line as it comes, timing each line from the start."""
    err_path = cwd / "stderr.txt"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None  # stdout=PIPE
        lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
        returncode = proc.wait()
        whole = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Finished(lines, returncode, whole, cpu, err_path.read_text())


def failure(case: TrainingCase, done: Finished, what: str) -> BenchError:
    last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output on stderr")
    return BenchError(f"bench case '{case.name}' {what} (exit {done.returncode}): {last.strip()[:300]}")


# --- fastdqn ----------------------------------------------------------------------------------------------
def training_config(opts: Any, variant: str, **changes: Any) -> Config:
    """CartPole training for opts.steps env steps; no evaluation but the final one (1 episode), one checkpoint
    at the end, one log line; torch threads from --threads where given, else the config's."""
    base = dict(
        device=opts.device,
        total_steps=opts.steps,
        learning_starts=opts.learning_starts,
        epsilon_decay_steps=opts.steps // 2,
        eval_every=0,
        eval_episodes=1,
        checkpoint_every=0,
        log_every=opts.steps,
        **TRAIN_VARIANTS[variant],
    )
    if opts.threads > 0:
        base["torch_threads"] = opts.threads
    return Config(**{**base, **changes}).validate()


class FastDQNRun:
    """`python -m fastdqn train --config <cfg> --quiet`: the command a user runs, in a new process.

    TorchInductor's cache (compiled code kept on disk between processes) is a fresh, empty dir per run unless
    `cache` names a dir that this case's runs share (warm: `measure_cases` fills it with one untimed run first).
    """

    def __init__(self, cfg: Config, cache: Path | None = None):
        self.cfg, self.cache = cfg, cache

    def command(self, scratch: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "fastdqn",
            "train",
            "--config",
            str(scratch / "config.yaml"),
            "--run-dir",
            str(scratch / "run"),
            "--quiet",
        ]

    def prepare(self, scratch: Path) -> dict[str, str]:
        (scratch / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(self.cache or scratch / "inductor-cache")}

    def measure(self, case: TrainingCase, done: Finished) -> dict[str, float]:
        result = next((json.loads(line) for _, line in reversed(done.lines) if line.startswith("{")), None)
        if done.returncode != 0 or result is None:
            raise failure(case, done, "failed" if done.returncode else "printed no JSON result")
        if "agent_results" in result:  # a population: its first update, and every agent's env steps
            agents = result["agent_results"]
            if any(r["steady_sps"] is None for r in agents):
                raise failure(case, done, "reported no first update")
            return {
                "first_update_s": agents[0]["first_update_time"],
                "steady_sps": sum(r["steady_sps"] for r in agents),
                "reported_sps": sum(r["env_steps"] for r in agents) / result["wall_time"],
            }
        if result["first_update_time"] is None or result["steady_sps"] is None:
            raise failure(case, done, "reported no first update (no update ran, or the OS gives no process start time)")
        return {
            "first_update_s": result["first_update_time"],
            "steady_sps": result["steady_sps"],
            "reported_sps": result["env_steps"] / result["wall_time"],
        }


# --- CleanRL ----------------------------------------------------------------------------------------------
class CleanRLRun:
    """CleanRL's real dqn.py, unmodified, in its own Python environment, with its own command-line flags."""

    def __init__(self, python: Path, script: Path, steps: int, learning_starts: int, device: str, threads: int):
        self.python, self.script, self.threads = python, script, threads
        self.flags = [
            "--total-timesteps",
            str(steps),
            "--learning-starts",
            str(learning_starts),
            "--seed",
            str(CLEANRL_DQN["seed"]),
        ]
        if device == "cpu":
            self.flags.append("--no-cuda")
        # The first update is at the first multiple of 10 past learning_starts; SPS lines come from the first
        # multiple of 100 past it, every 100 env steps, to the last one before total_timesteps.
        first = (learning_starts // CLEANRL_SPS_EVERY + 1) * CLEANRL_SPS_EVERY
        self.sps_steps = list(range(first, steps, CLEANRL_SPS_EVERY))

    def command(self, scratch: Path) -> list[str]:
        return [str(self.python), str(self.script), *self.flags]

    def prepare(self, scratch: Path) -> dict[str, str]:
        """Its checkout root goes on PYTHONPATH (dqn.py imports cleanrl_utils from there); it runs in the scratch
        dir, where its TensorBoard writer puts runs/. dqn.py sets no thread count: threads > 0 sets
        OMP_NUM_THREADS, which torch's default follows, and 0 leaves torch's default (one per core)."""
        root = str(self.script.resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        threads = {"OMP_NUM_THREADS": str(self.threads)} if self.threads > 0 else {}
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **threads}

    def measure(self, case: TrainingCase, done: Finished) -> dict[str, float]:
        if done.returncode != 0:
            raise failure(case, done, "failed")
        sps = [(t, int(m.group(1))) for t, line in done.lines if (m := SPS_LINE.match(line))]
        if len(sps) != len(self.sps_steps) or len(sps) < 2:
            raise failure(
                case,
                done,
                f"printed {len(sps)} 'SPS:' lines where CleanRL's dqn.py prints "
                f"{len(self.sps_steps)} for these flags (at least 2 are needed)",
            )
        (first_arrival, first_sps), (_, last_sps) = sps[0], sps[-1]
        first_step, last_step = self.sps_steps[0], self.sps_steps[-1]
        loop_time = last_step / last_sps - first_step / first_sps
        return {
            "first_update_s": first_arrival,
            "steady_sps": (last_step - first_step) / loop_time,
            "reported_sps": float(last_sps),
        }


def check_cleanrl(opts: Any) -> None:
    if not opts.cleanrl_script or not opts.cleanrl_python:
        raise ConfigError(
            "the cleanrl suite runs CleanRL's own dqn.py: pass --cleanrl-script PATH/cleanrl/dqn.py "
            "and --cleanrl-python PATH/TO/ITS/ENV/bin/python (docs/performance.md: comparing with CleanRL)"
        )
    for flag, path in (("--cleanrl-script", opts.cleanrl_script), ("--cleanrl-python", opts.cleanrl_python)):
        if not Path(path).is_file():
            raise ConfigError(
                f"{flag} {path} is not a file: point it at CleanRL's dqn.py and at the python of "
                "the environment it is installed in"
            )


def interpreter(python: str | Path) -> dict[str, Any]:
    """Versions and default torch threads of an interpreter, asked in a fresh process of it."""
    done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(
            f"{python} cannot import torch, gymnasium and numpy: "
            f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}"
        )
    return json.loads(done.stdout)


# --- suites -----------------------------------------------------------------------------------------------
def run_once(case: TrainingCase, runner: Any) -> dict[str, float]:
    """One run of a case: a new process in a new scratch dir, which is removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="fastdqn-bench-"))
    try:
        env = runner.prepare(scratch)
        done = run_process(runner.command(scratch), scratch, env)
        return {"whole_s": done.whole_s, "cpu_s": done.cpu_s, **runner.measure(case, done)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_cases(cases: list[tuple[TrainingCase, Any]], repeats: int) -> list[TrainingCase]:
    """Run every case `repeats` times, taking turns (A B C A B C ...); a case with a warm compile cache first
    runs once untimed to fill it."""
    for case, runner in cases:
        if getattr(runner, "cache", None) is not None:
            console.print(f"  filling the compile cache of {case.name} (untimed run)")
            run_once(case, runner)
    for r in range(repeats):
        for case, runner in cases:
            run = run_once(case, runner)
            case.runs.append(run)
            console.print(
                f"  run {r + 1}/{repeats} {case.name}: {run['whole_s']:.1f} s whole, first update at "
                f"{run['first_update_s']:.1f} s, {run['steady_sps']:,.0f} env steps/s after it"
            )
    return [case for case, _ in cases]


def fastdqn_cases(suite: str, name: str, cfg: Config, opts: Any, caches: Path) -> list[tuple[TrainingCase, Any]]:
    """The case of `cfg`; a compiled config gives one per --compile-cache mode (cold: an empty cache each run;
    warm: a cache under `caches` kept from the case's previous runs)."""
    modes = opts.compile_cache if cfg.compile else [None]
    out: list[tuple[TrainingCase, Any]] = []
    for mode in modes:
        label = f"{name}, {mode} compile cache" if mode else name
        cache = caches / re.sub(r"[^A-Za-z0-9]+", "-", f"{suite}-{label}") if mode == "warm" else None
        runner = FastDQNRun(cfg, cache)
        info = {
            "config": cfg.to_dict(),
            "inductor_cache": "kept between runs, filled by one untimed run" if cache else "fresh per run",
        }
        out.append((TrainingCase(suite, label, runner.command(Path("<scratch>")), info), runner))
    return out


def e2e_cases(opts: Any, caches: Path) -> list[tuple[TrainingCase, Any]]:
    """fastdqn on CartPole with each env count of --envs at replay ratio 1/4 (one update every 4 env steps)."""
    return [
        case
        for v in opts.train_variants
        for n in opts.envs
        for case in fastdqn_cases(
            "e2e", f"{n} envs, {v}", training_config(opts, v, num_envs=n, train_every=4, gradient_steps=1), opts, caches
        )
    ]


def cleanrl_cases(opts: Any, caches: Path) -> list[tuple[TrainingCase, Any]]:
    """CleanRL's dqn.py (1 env) and fastdqn at its settings: 1 env; 16 envs with its schedule of one update
    every 10 env steps; 16 envs with the same replay ratio in phases of 64 updates every 640 env steps."""
    check_cleanrl(opts)
    script = Path(opts.cleanrl_script).resolve()
    python = interpreter(opts.cleanrl_python)
    cases: list[tuple[TrainingCase, Any]] = []
    for threads in opts.cleanrl_threads:
        runner = CleanRLRun(Path(opts.cleanrl_python), script, opts.steps, opts.learning_starts, opts.device, threads)
        info = {
            "script": str(script),
            "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
            "flags": runner.flags,
            "interpreter": python,
            "OMP_NUM_THREADS": threads or None,
        }
        name = (
            f"cleanrl dqn.py, 1 env, OMP_NUM_THREADS={threads}"
            if threads
            else f"cleanrl dqn.py, 1 env, torch's default {python['torch_threads']} threads"
        )
        cases.append((TrainingCase("cleanrl", name, runner.command(Path("<scratch>")), info), runner))
    for v in opts.train_variants:
        same = training_config(opts, v, **CLEANRL_DQN)
        for name, cfg in (
            (f"fastdqn 1 env, 1 update / 10 steps, {v}", same.updated(num_envs=1)),
            (f"fastdqn 16 envs, 1 update / 10 steps, {v}", same.updated(num_envs=16)),
            (
                f"fastdqn 16 envs, 64 updates / 640 steps, {v}",
                same.updated(num_envs=16, train_every=640, gradient_steps=64),
            ),
        ):
            cases += fastdqn_cases("cleanrl", name, cfg, opts, caches)
    return cases


def overlap_cases(opts: Any, caches: Path) -> list[tuple[TrainingCase, Any]]:
    """Pong through ale-py's vector env on one C++ thread, the Nature-CNN update (batch 32) on one torch thread,
    one update per vector step of --overlap-envs envs: the sequential loop (overlap never) against the envs
    stepping while the update runs (overlap always). The env count balances the two, chosen by measurement on this
    project's 2-core CPU: at 64 envs the envs' step was the shorter one (the overlap gained 1.46x,
    benchmarks/results/bench-20261202-021132.json); at 96 a profile of the overlapped loop shows the envs' step (30
    ms) and the update (28.5 ms) about equal, with a 14.5 ms act before them (benchmarks/results/overlap_trace.json)."""
    n = opts.overlap_envs
    cfg = training_config(
        opts,
        "eager",
        env_id="ALE/Pong-v5",
        num_envs=n,
        env_threads=1,
        torch_threads=1,
        train_every=n,
        gradient_steps=1,
        batch_size=32,
        buffer_size=max(opts.steps, 10_000),
    )
    return [
        case
        for mode in ("never", "always")
        for case in fastdqn_cases("overlap", f"Pong, {n} envs, overlap {mode}", cfg.updated(overlap=mode), opts, caches)
    ]


def population_cases(opts: Any, caches: Path) -> list[tuple[TrainingCase, Any]]:
    """The default CartPole config (evaluations, checkpoints and all) trained by one process per --agents count:
    one agent with the config's one torch thread, populations with each of --agent-threads. A population's
    env steps are every agent's (K x total_steps)."""
    base = Config(device=opts.device, total_steps=opts.steps, learning_starts=opts.learning_starts)
    cases: list[tuple[TrainingCase, Any]] = []
    for k in opts.agents:
        for threads in [base.torch_threads] if k == 1 else opts.agent_threads:
            name = f"{k} agent{'s' * (k > 1)}, default config, {threads} torch thread{'s' * (threads > 1)}"
            cases += fastdqn_cases("population", name, base.updated(agents=k, torch_threads=threads), opts, caches)
    return cases


SUITE_CASES = {"e2e": e2e_cases, "cleanrl": cleanrl_cases, "overlap": overlap_cases, "population": population_cases}


def bench_training(suite: str, opts: Any) -> list[TrainingCase]:
    """The e2e, cleanrl or overlap suite; speed-ups are against its first case."""
    with tempfile.TemporaryDirectory(prefix="fastdqn-bench-caches-") as caches:
        cases = SUITE_CASES[suite](opts, Path(caches))
        for case, _ in cases:
            case.baseline = cases[0][0].name
        return measure_cases(cases, opts.repeats)
