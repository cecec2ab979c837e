"""The measurements behind `fastdqn bench`: update-step variants, replay calls and whole training runs.

Cases are timed round-robin (round 1 of every case, then round 2, ...), so load from other processes hits them
alike; each `Case` keeps all its samples and its speed-up over the suite's baseline from the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdqn.bench import VARIANT_NAMES
from fastdqn.config import Config
from fastdqn.errors import ConfigError
from fastdqn.learner import DQNLearner
from fastdqn.logs import console
from fastdqn.replay import ReplayBuffer
from fastdqn.update_runner import make_update_runner

# Config changes of each update-step variant, as the update runner reads them.
VARIANTS = dict(zip(VARIANT_NAMES, ({"cuda_graph": "never"}, {"compile": True, "cuda_graph": "never"},
                                    {"compile": True, "amp": True, "cuda_graph": "never"},
                                    {"compile": True, "amp": True, "cuda_graph": "always"})))
CLEANRL_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "cleanrl_dqn.py"
CARTPOLE = ((4,), 2)
PRESAMPLED = 32  # distinct batches the eager and compiled update benchmarks cycle through
ATARI = ((4, 84, 84), 6)


@dataclass
class Case:
    """One timed case: `samples` are seconds per `unit`, one per round (or per training run)."""

    suite: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str = ""
    speedup: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


# --- building blocks --------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def filled_replay(obs_shape: tuple[int, ...], n_actions: int, capacity: int, device: torch.device,
                  num_envs: int = 1) -> ReplayBuffer:
    """A full replay of random transitions (uint8 frames for pixel shapes)."""
    pixels = len(obs_shape) == 3
    dtype = torch.uint8 if pixels else torch.float32
    replay = ReplayBuffer(capacity, num_envs, obs_shape, dtype, device)
    g = torch.Generator().manual_seed(0)

    def obs() -> torch.Tensor:
        if pixels:
            return torch.randint(0, 256, (replay.capacity, *obs_shape), dtype=torch.uint8, generator=g)
        return torch.randn((replay.capacity, *obs_shape), generator=g)

    zeros = torch.zeros(replay.capacity)
    replay.load_state_dict({"pos": 0, "size": replay.capacity, "obs": obs(), "next_obs": obs(),
                            "actions": torch.randint(0, n_actions, (replay.capacity,), generator=g),
                            "rewards": torch.randn(replay.capacity, generator=g),
                            "terminated": (torch.rand(replay.capacity, generator=g) < 0.05).float(),
                            "truncated": zeros})
    return replay


def update_fn(cfg: Config, variant: str, obs_shape: tuple[int, ...], n_actions: int, replay: ReplayBuffer,
              device: torch.device) -> Callable[[], Any]:
    """One update of `variant` on a new batch. The update step alone is timed: eager and compiled cycle through
    batches sampled beforehand (the replay suite times sampling); the CUDA graph samples inside its graph, so
    its time includes sampling."""
    torch.manual_seed(cfg.seed)
    learner = DQNLearner(cfg.updated(**VARIANTS[variant]), obs_shape, n_actions, device)
    runner = make_update_runner(learner, replay)
    if variant == "cuda-graph":
        return runner.step
    batches = itertools.cycle([replay.sample(cfg.batch_size) for _ in range(PRESAMPLED)])
    return lambda: runner.update(next(batches))


def clock(opts: argparse.Namespace) -> Callable[[], float]:
    """wall: time.perf_counter. cpu: this process's CPU time, which other processes' load on a shared CPU
    does not inflate (single-threaded CPU runs only: it misses GPU work and time spent in other processes)."""
    return time.process_time if opts.clock == "cpu" else time.perf_counter


def round_robin(cases: dict[str, Callable[[], Any]], iters: int, rounds: int, warmup: int,
                device: torch.device, now: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each case, one sample per round; cases alternate within every round."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = now()
            for _ in range(iters):
                fn()
            synchronize(device)
            samples[name].append((now() - start) / iters)
    return samples


def with_speedups(cases: list[Case], baseline: str) -> list[Case]:
    """Speed-up of each case over the one named `baseline` (ratio of medians from the same run)."""
    base = next(c for c in cases if c.name == baseline)
    for case in cases:
        case.baseline, case.speedup = baseline, base.median / case.median
    return cases


# --- suites -----------------------------------------------------------------------------------------------
def bench_update(suite: str, device: torch.device, variants: list[str], opts: argparse.Namespace) -> list[Case]:
    """Update step of the CartPole MLP at batch 128 or the Nature CNN at batch 32, per variant."""
    (obs_shape, n_actions), batch_size = (CARTPOLE, 128) if suite == "update-mlp" else (ATARI, 32)
    cfg = Config(device=str(device), batch_size=batch_size)
    replay = filled_replay(obs_shape, n_actions, 10_000 if suite == "update-mlp" else 2_000, device)
    if device.type != "cuda" and "cuda-graph" in variants:
        console.print("[yellow]cuda-graph skipped: it needs a CUDA device[/]")
        variants = [v for v in variants if v != "cuda-graph"]
    fns = {v: update_fn(cfg, v, obs_shape, n_actions, replay, device) for v in variants}
    iters = opts.iters if suite == "update-mlp" else max(1, opts.iters // 10)
    samples = round_robin(fns, iters, opts.rounds, opts.warmup, device, clock(opts))
    cases = [Case(suite, v, "update", samples[v], info={"batch_size": batch_size, **VARIANTS[v]}) for v in variants]
    return with_speedups(cases, variants[0])


def bench_replay(device: torch.device, opts: argparse.Namespace) -> list[Case]:
    """Adding one vector step of 16 CartPole envs, and sampling a batch of 128."""
    num_envs = 16
    replay = filled_replay((4,), 2, 100_000, device, num_envs)
    step = (torch.randn(num_envs, 4, device=device), torch.zeros(num_envs, dtype=torch.int64, device=device),
            torch.ones(num_envs, device=device), torch.randn(num_envs, 4, device=device),
            torch.zeros(num_envs, device=device))
    fns = {"add (16 envs)": lambda: replay.add(*step), "sample (batch 128)": lambda: replay.sample(128)}
    samples = round_robin(fns, opts.iters, opts.rounds, opts.warmup, device, clock(opts))
    return [Case("replay", name, "call", samples[name]) for name in fns]


def e2e_config(opts: argparse.Namespace, device: torch.device, **changes: Any) -> Config:
    """CartPole training for `opts.steps` env steps, without evaluations or checkpoints in the way."""
    base = dict(device=str(device), total_steps=opts.steps, learning_starts=opts.learning_starts,
                epsilon_decay_steps=opts.steps // 2, eval_every=0, eval_episodes=1, checkpoint_every=0,
                log_every=opts.steps, compile=opts.compile, amp=opts.amp)
    return Config(**{**base, **changes})


def train(cfg: Config) -> None:
    """One whole `fastdqn train` run (envs, replay, learner, loop, final evaluation) in a scratch dir."""
    from fastdqn.api import train as train_run

    with tempfile.TemporaryDirectory() as run_dir:
        train_run(cfg, run_dir, overwrite=True, show_progress=False)


def measure_runs(runs: dict[str, Callable[[], Any]], steps: int, repeats: int,
                 now: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds per env step of each whole run of `steps` env steps (set-up included), `repeats` times,
    alternating the runs, after one untimed run of each: the timed runs find imports done and, with --compile,
    the update step already compiled (learners share it), as every run after the first in a process does."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = now()
            run()
            samples[name].append((now() - start) / steps)
    return samples


def bench_e2e(device: torch.device, opts: argparse.Namespace) -> list[Case]:
    """`fastdqn train` on CartPole with 1, 16 and 64 envs at replay ratio 1/4 (one update every 4 env steps)."""
    configs = {f"{n} envs": e2e_config(opts, device, num_envs=n, train_every=4, gradient_steps=1)
               for n in opts.envs}
    runs = {name: (lambda c=cfg: train(c)) for name, cfg in configs.items()}
    samples = measure_runs(runs, opts.steps, opts.repeats, clock(opts))
    cases = [Case("e2e", name, "env step", samples[name], info=configs[name].to_dict()) for name in configs]
    return with_speedups(cases, cases[0].name)


def load_cleanrl() -> Any:
    if not CLEANRL_FILE.is_file():
        raise ConfigError(f"the CleanRL baseline {CLEANRL_FILE} is missing: run `fastdqn bench` from a source "
                          "checkout, or leave out the cleanrl suite")
    spec = importlib.util.spec_from_file_location("cleanrl_dqn", CLEANRL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def bench_cleanrl(device: torch.device, opts: argparse.Namespace) -> list[Case]:
    """CleanRL dqn.py (1 env) against fastdqn with 16 envs doing the same work per env step: a 120-84 MLP,
    batch 128, one MSE update per 10 env steps (also grouped, see below), no Double DQN, no gradient clipping, a
    target copy every 500 env steps. fastdqn steps CartPole with its default vector_mode (auto: gymnasium's
    numpy-vectorized CartPole)."""
    cleanrl = load_cleanrl()
    args = cleanrl.Args(total_timesteps=opts.steps, learning_starts=opts.learning_starts)
    same_work = e2e_config(opts, device, num_envs=16, hidden_sizes=[120, 84], batch_size=128, train_every=10,
                           gradient_steps=1, loss="mse", double_dqn=False, max_grad_norm=0.0,
                           learning_rate=args.learning_rate, buffer_size=args.buffer_size,
                           target_update_interval=args.target_network_frequency)
    # The same replay ratio with the updates in phases, as fastdqn's default config runs them (128 every 256 env
    # steps): 64 updates every 640 env steps (40 vector steps) back to back keep the update's working set in cache
    # instead of alternating it with env stepping and acting.
    grouped = same_work.updated(train_every=640, gradient_steps=64)
    runs = {"cleanrl dqn.py (1 env)": lambda: cleanrl.train(args, device),
            "fastdqn (16 envs)": lambda: train(same_work),
            "fastdqn (16 envs, 64 updates / 640 steps)": lambda: train(grouped)}
    samples = measure_runs(runs, opts.steps, opts.repeats, clock(opts))
    cases = [Case("cleanrl", name, "env step", samples[name]) for name in runs]
    for case, info in zip(cases, (asdict(args), same_work.to_dict(), grouped.to_dict())):
        case.info = info
    return with_speedups(cases, cases[0].name)
