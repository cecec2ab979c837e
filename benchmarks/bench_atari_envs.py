"""Atari throughput: env steps/s of ale-py's vector env vs the gymnasium fallback, and FrameReplay add + sample.

    python benchmarks/bench_atari_envs.py                       # 8/16/32 envs, Pong, 3 rounds
    python benchmarks/bench_atari_envs.py --envs 4 --steps 400 --rounds 1 --capacity 4000   # a quick look

Cases are timed round-robin (round 1 of every case, then round 2, ...) so load from other processes hits them
alike; the table shows medians and ratios measured in the same run. Random actions; the env is built and reset
outside the timing. Replay: one `add` is one vector step of N envs, one `sample` is a batch of 32 stacks,
against a ReplayBuffer that stores uint8 obs and next-obs stacks (what FrameReplay replaces).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fastdqn.config import Config
from fastdqn.envs import make_vector_env
from fastdqn.frame_replay import FrameReplay
from fastdqn.replay import ReplayBuffer


def env_stepper(cfg: Config, num_envs: int, steps: int) -> tuple[Callable[[], float], Callable[[], None]]:
    """(run, close): `run()` steps `num_envs` envs with random actions for ~`steps` env steps, returns seconds."""
    envs = make_vector_env(cfg, num_envs)
    envs.reset(seed=cfg.seed)
    rng = np.random.default_rng(0)
    n_actions = int(envs.single_action_space.n)

    def run() -> float:
        actions = rng.integers(0, n_actions, (max(steps // num_envs, 1), num_envs))
        start = time.perf_counter()
        for a in actions:
            envs.step(a)
        return time.perf_counter() - start

    return run, envs.close


def replay_cases(num_envs: int, capacity: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """One add (a vector step) and one sample (batch 32) for FrameReplay and for a stacked uint8 ReplayBuffer."""
    frames = FrameReplay(capacity, num_envs, (84, 84), 4, device)
    stacked = ReplayBuffer(capacity, num_envs, (4, 84, 84), torch.uint8, device)
    frame = torch.randint(0, 256, (num_envs, 84, 84), dtype=torch.uint8, device=device)
    stack = torch.randint(0, 256, (num_envs, 4, 84, 84), dtype=torch.uint8, device=device)
    zeros = torch.zeros(num_envs, device=device)
    actions = torch.zeros(num_envs, dtype=torch.int64, device=device)
    no = torch.zeros(num_envs, dtype=torch.bool, device=device)
    frames.add_resets(frame)
    while len(frames) < frames.capacity:
        frames.add(frame, actions, zeros, no.to(torch.uint8), no)
        stacked.add(stack, actions, zeros, stack, zeros, zeros)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return {
        f"FrameReplay add ({num_envs} envs)": lambda: (
            frames.add(frame, actions, zeros, no.to(torch.uint8), no),
            sync(),
        ),
        "FrameReplay sample (32)": lambda: (frames.sample(32), sync()),
        f"stacked uint8 add ({num_envs} envs)": lambda: (
            stacked.add(stack, actions, zeros, stack, zeros, zeros),
            sync(),
        ),
        "stacked uint8 sample (32)": lambda: (stacked.sample(32), sync()),
    }


def timed(fn: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--game", default="ALE/Pong-v5")
    parser.add_argument("--envs", default="8,16,32", help="comma-separated env counts ('' = replay cases only)")
    parser.add_argument("--steps", type=int, default=4000, help="env steps per round and case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vector-mode", default="sync", choices=["sync", "async"], help="gymnasium fallback's")
    parser.add_argument("--capacity", type=int, default=20_000, help="replay capacity for the replay cases")
    parser.add_argument("--replay-envs", type=int, default=16, help="envs per vector step in the replay cases")
    parser.add_argument("--replay-iters", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    counts = [int(n) for n in args.envs.split(",") if n]

    env_cases = {}
    for n in counts:
        for backend in ("ale_vector", "gymnasium"):
            cfg = Config(env_id=args.game, atari_backend=backend, vector_mode=args.vector_mode, env_threads=0)
            env_cases[(backend, n)] = env_stepper(cfg, n, args.steps)
    replay = replay_cases(args.replay_envs, args.capacity, device)
    env_sps: dict[tuple[str, int], list[float]] = {k: [] for k in env_cases}
    replay_s: dict[str, list[float]] = {k: [] for k in replay}
    for _ in range(args.rounds):
        for key, (run, _close) in env_cases.items():
            env_sps[key].append(max(args.steps // key[1], 1) * key[1] / run())
        for name, fn in replay.items():
            replay_s[name].append(timed(fn, args.replay_iters))
    for _run, close in env_cases.values():
        close()

    results: dict[str, dict] = {"env_sps": {}, "replay_us": {}}
    if counts:
        print(f"env steps/s, {args.game}, median of {args.rounds} rounds (gymnasium {args.vector_mode}):")
        print(f"{'envs':>5} {'ale_vector':>12} {'gymnasium':>12} {'ratio':>7}")
    for n in counts:
        ale, gym_ = (statistics.median(env_sps[(b, n)]) for b in ("ale_vector", "gymnasium"))
        print(f"{n:>5} {ale:>12,.0f} {gym_:>12,.0f} {ale / gym_:>6.2f}x")
        results["env_sps"][str(n)] = {"ale_vector": ale, "gymnasium": gym_}
    print(
        f"replay on {device}, capacity {args.capacity:,}, {torch.get_num_threads()} torch threads (median "
        f"microseconds per call over {args.rounds} rounds):"
    )
    for name, samples in replay_s.items():
        us = statistics.median(samples) * 1e6
        print(f"  {name:<30} {us:>10,.1f} us")
        results["replay_us"][name] = us
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))


if __name__ == "__main__":
    main()
