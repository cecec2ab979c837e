"""Replay add (one vector step of 16 CartPole envs) and sample (batch 128) on the training device."""

from __future__ import annotations

import torch

from fastdqn.bench_suites import filled_replay, synchronize


def test_replay_add(benchmark, device):
    replay = filled_replay((4,), 2, 100_000, device, num_envs=16)
    step = (
        torch.randn(16, 4, device=device),
        torch.zeros(16, dtype=torch.int64, device=device),
        torch.ones(16, device=device),
        torch.randn(16, 4, device=device),
        torch.zeros(16, device=device),
    )
    benchmark(lambda: (replay.add(*step), synchronize(device)))


def test_replay_sample(benchmark, device):
    replay = filled_replay((4,), 2, 100_000, device, num_envs=16)
    benchmark(lambda: (replay.sample(128), synchronize(device)))
