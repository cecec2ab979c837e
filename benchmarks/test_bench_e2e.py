"""End-to-end `fastdqn train` on CartPole (replay ratio 1/4) with 1, 16 and 64 envs: seconds per run of STEPS
env steps (env steps/s = STEPS / that time). One round each: a run is seconds long."""

from __future__ import annotations

import argparse

import pytest

from fastdqn.bench_suites import e2e_config, train

STEPS = 6_000


@pytest.mark.parametrize("num_envs", [1, 16, 64])
def test_train_cartpole(benchmark, device, num_envs):
    opts = argparse.Namespace(steps=STEPS, learning_starts=1_000, compile=False, amp=False)
    cfg = e2e_config(opts, device, num_envs=num_envs, train_every=4, gradient_steps=1)
    benchmark.pedantic(train, args=(cfg,), rounds=1, iterations=1)
