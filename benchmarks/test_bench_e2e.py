"""End-to-end `fastdqn train` on CartPole (replay ratio 1/4) with 1, 16 and 64 envs: seconds per whole run of
STEPS env steps, each run a new process (imports, env start and the final evaluation included), as the e2e
suite of `fastdqn bench` runs it. One round each: a run is seconds long."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastdqn.bench_cases import TrainingCase
from fastdqn.bench_training import FastDQNRun, run_once, training_config

STEPS = 6_000


@pytest.mark.parametrize("num_envs", [1, 16, 64])
def test_train_cartpole(benchmark, device, num_envs):
    opts = SimpleNamespace(steps=STEPS, learning_starts=1_000, device=str(device), threads=0)
    cfg = training_config(opts, "eager", num_envs=num_envs, train_every=4, gradient_steps=1)
    case = TrainingCase("e2e", f"{num_envs} envs", [])
    benchmark.pedantic(run_once, args=(case, FastDQNRun(cfg)), rounds=1, iterations=1)
