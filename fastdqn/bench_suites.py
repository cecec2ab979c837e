"""The in-process suites of `fastdqn bench`: update-step variants and replay calls (training runs, each in a
process of its own, are in `fastdqn.bench_training`).

Cases are timed round-robin (round 1 of every case, then round 2, ...), so load from other processes hits them
alike; each `Case` keeps all its samples and its speed-up over the suite's baseline from the same run.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastdqn.bench_cases import VARIANTS, Case, with_speedups
from fastdqn.config import Config
from fastdqn.learner import DQNLearner
from fastdqn.logs import console
from fastdqn.replay import ReplayBuffer
from fastdqn.update_runner import make_update_runner

CARTPOLE = ((4,), 2)
PRESAMPLED = 32  # distinct batches the eager and compiled update benchmarks cycle through
ATARI = ((4, 84, 84), 6)


# --- building blocks --------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def filled_replay(
    obs_shape: tuple[int, ...], n_actions: int, capacity: int, device: torch.device, num_envs: int = 1
) -> ReplayBuffer:
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
    replay.load_state_dict(
        {
            "pos": 0,
            "size": replay.capacity,
            "obs": obs(),
            "next_obs": obs(),
            "actions": torch.randint(0, n_actions, (replay.capacity,), generator=g),
            "rewards": torch.randn(replay.capacity, generator=g),
            "terminated": (torch.rand(replay.capacity, generator=g) < 0.05).float(),
            "truncated": zeros,
        }
    )
    return replay


def update_fn(
    cfg: Config, variant: str, obs_shape: tuple[int, ...], n_actions: int, replay: ReplayBuffer, device: torch.device
) -> Callable[[], Any]:
    """One update of `variant` on a new batch. The update step alone is timed: eager and compiled cycle through
    batches sampled beforehand (the replay suite times sampling); the CUDA graph samples inside its graph, so
    its time includes sampling."""
    torch.manual_seed(cfg.seed)
    learner = DQNLearner(cfg.updated(**VARIANTS[variant]), obs_shape, n_actions, device)
    if variant == "eager-autograd":  # what the eager step of a plain MLP would take without its hand gradients
        learner.by_hand = False
    runner = make_update_runner(learner, replay)
    if variant == "cuda-graph":
        return runner.step
    batches = itertools.cycle([replay.sample(cfg.batch_size) for _ in range(PRESAMPLED)])
    return lambda: runner.update(next(batches))


def clock(opts: argparse.Namespace) -> Callable[[], float]:
    """wall: time.perf_counter. cpu: this process's CPU time, which other processes' load on a shared CPU
    does not inflate (single-threaded CPU runs only: it misses GPU work and time spent in other processes)."""
    return time.process_time if opts.clock == "cpu" else time.perf_counter


def round_robin(
    cases: dict[str, Callable[[], Any]],
    iters: int,
    rounds: int,
    warmup: int,
    device: torch.device,
    now: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
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


# --- suites -----------------------------------------------------------------------------------------------
def bench_update(suite: str, device: torch.device, variants: list[str], opts: argparse.Namespace) -> list[Case]:
    """Update step of the CartPole MLP at batch 128 or the Nature CNN at batch 32, per variant."""
    (obs_shape, n_actions), batch_size = (CARTPOLE, 128) if suite == "update-mlp" else (ATARI, 32)
    cfg = Config(device=str(device), batch_size=batch_size)
    replay = filled_replay(obs_shape, n_actions, 10_000 if suite == "update-mlp" else 2_000, device)
    if device.type != "cuda" and "cuda-graph" in variants:
        console.print("[yellow]cuda-graph skipped: it needs a CUDA device[/]")
        variants = [v for v in variants if v != "cuda-graph"]
    if suite != "update-mlp":  # a CNN's eager step takes autograd's gradients anyway
        variants = [v for v in variants if v != "eager-autograd"]
    fns = {v: update_fn(cfg, v, obs_shape, n_actions, replay, device) for v in variants}
    iters = opts.iters if suite == "update-mlp" else max(1, opts.iters // 10)
    samples = round_robin(fns, iters, opts.rounds, opts.warmup, device, clock(opts))
    cases = [Case(suite, v, "update", samples[v], info={"batch_size": batch_size, **VARIANTS[v]}) for v in variants]
    return with_speedups(cases, variants[0])


def bench_replay(device: torch.device, opts: argparse.Namespace) -> list[Case]:
    """Adding one vector step of 16 CartPole envs, and sampling a batch of 128."""
    num_envs = 16
    replay = filled_replay((4,), 2, 100_000, device, num_envs)
    step = (
        torch.randn(num_envs, 4, device=device),
        torch.zeros(num_envs, dtype=torch.int64, device=device),
        torch.ones(num_envs, device=device),
        torch.randn(num_envs, 4, device=device),
        torch.zeros(num_envs, device=device),
    )
    fns = {"add (16 envs)": lambda: replay.add(*step), "sample (batch 128)": lambda: replay.sample(128)}
    samples = round_robin(fns, opts.iters, opts.rounds, opts.warmup, device, clock(opts))
    return [Case("replay", name, "call", samples[name]) for name in fns]


class TimedStep:
    """Wraps a vector env's `step`, adding the time spent in it (by `now`) to `seconds`."""

    def __init__(self, step: Callable[..., Any], now: Callable[[], float]):
        self.step, self.now, self.seconds = step, now, 0.0

    def __call__(self, actions: Any) -> Any:
        start = self.now()
        try:
            return self.step(actions)
        finally:
            self.seconds += self.now() - start


def bench_loop(device: torch.device, opts: argparse.Namespace) -> list[Case]:
    """The training loop's own time per vector step, for each env count of --envs: everything `vector_step`
    does (acting with the network at epsilon 0.05, staging, the replay add, episode bookkeeping) except
    the envs' `step`, which is timed and taken out. CartPole with no update due (learning_starts out of
    reach), so the updates are not in it either."""
    from fastdqn.trainer import Trainer

    now = clock(opts)
    trainers: dict[str, Trainer] = {}
    timers: dict[str, TimedStep] = {}
    with tempfile.TemporaryDirectory(prefix="fastdqn-bench-loop-") as scratch:
        for n in opts.envs:
            cfg = Config(
                num_envs=n,
                device=str(device),
                learning_starts=10**9,
                total_steps=10**9,
                epsilon_start=0.05,
                epsilon_end=0.05,
                eval_every=0,
                checkpoint_every=0,
                buffer_size=100_000,
            ).validate()
            trainer = Trainer(cfg, Path(scratch) / f"{n}", show_progress=False)
            name = f"{n} envs"
            trainers[name] = trainer
            timers[name] = timer = TimedStep(trainer.envs.step, now)
            trainer.envs.step = timer  # type: ignore[method-assign]  # the steppers call envs.step: timed in place
        samples: dict[str, list[float]] = {name: [] for name in trainers}
        env_seconds: dict[str, float] = {name: 0.0 for name in trainers}
        for trainer in trainers.values():
            for _ in range(opts.warmup):
                trainer.vector_step()
        for _ in range(opts.rounds):  # the cases take turns, as in round_robin
            for name, trainer in trainers.items():
                timer = timers[name]
                timer.seconds, start = 0.0, now()
                for _ in range(opts.iters):
                    trainer.vector_step()
                synchronize(device)
                samples[name].append((now() - start - timer.seconds) / opts.iters)
                env_seconds[name] += timer.seconds
        for trainer in trainers.values():
            trainer.close()
    steps = opts.rounds * opts.iters
    return [
        Case(
            "loop",
            name,
            "vector step",
            samples[name],
            info={"what": "vector_step minus envs.step, no update", "env_step_us": 1e6 * env_seconds[name] / steps},
        )
        for name in trainers
    ]
