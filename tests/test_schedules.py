"""Epsilon and learning-rate schedules, and that they (and target syncs) count env steps whatever num_envs is."""

from __future__ import annotations

import math

import pytest

from core_helpers import classic, drive, trainer_without_run
from fastdqn.config import Config
from fastdqn.schedules import epsilon_at, learning_rate_at


def eps_cfg(schedule: str, **kw) -> Config:
    return Config(epsilon_schedule=schedule, epsilon_start=1.0, epsilon_end=0.1, epsilon_decay_steps=100, **kw)


def test_linear_epsilon():
    cfg = eps_cfg("linear")
    assert [epsilon_at(cfg, s) for s in (0, 25, 50, 100, 101, 10_000)] == pytest.approx(
        [1.0, 0.775, 0.55, 0.1, 0.1, 0.1]
    )


def test_exponential_epsilon():
    cfg = eps_cfg("exponential")
    assert epsilon_at(cfg, 0) == pytest.approx(1.0)
    assert epsilon_at(cfg, 100) == pytest.approx(0.1 + 0.9 * math.exp(-1))
    assert epsilon_at(cfg, 250) == pytest.approx(0.1 + 0.9 * math.exp(-2.5))
    values = [epsilon_at(cfg, s) for s in range(0, 1_000, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert epsilon_at(cfg, 10_000) == pytest.approx(0.1, abs=1e-12) and epsilon_at(cfg, 10_000) >= 0.1


def test_step_epsilon():
    cfg = eps_cfg("step", epsilon_step_factor=0.5)
    steps = (0, 99, 100, 199, 200, 300, 400, 10_000)
    assert [epsilon_at(cfg, s) for s in steps] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.125, 0.1, 0.1])


def test_constant_epsilon():
    cfg = eps_cfg("constant").updated(epsilon_start=0.3)
    assert {epsilon_at(cfg, s) for s in (0, 100, 10**6)} == {0.3}


def test_epsilon_can_rise_when_end_is_above_start():
    cfg = Config(epsilon_start=0.0, epsilon_end=0.5, epsilon_decay_steps=10)
    assert [epsilon_at(cfg, s) for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.25, 0.5, 0.5])


def test_linear_learning_rate():
    cfg = Config(learning_rate=1e-3, lr_end=1e-4, lr_schedule="linear", total_steps=1_000)
    assert [learning_rate_at(cfg, s) for s in (0, 500, 1_000, 2_000)] == pytest.approx([1e-3, 5.5e-4, 1e-4, 1e-4])
    constant = cfg.updated(lr_schedule="constant")
    assert {learning_rate_at(constant, s) for s in (0, 500, 2_000)} == {1e-3}


def record_schedules(cfg: Config, run_dir, env_steps: int) -> tuple[dict[int, float], dict[int, float], int]:
    """Drive a trainer; return epsilon used and LR set at each env step, and the number of target syncs."""
    epsilons: dict[int, float] = {}
    lrs: dict[int, float] = {}
    with trainer_without_run(cfg, run_dir) as trainer:
        learner, counters = trainer.learner, trainer.counters
        act, set_lr, sync = learner.act, learner.set_learning_rate, learner.sync_target
        syncs = 0

        def recording_act(obs, epsilon, generator=None):
            epsilons[trainer.counters.env_step] = epsilon
            return act(obs, epsilon)

        def recording_set_lr(value):
            lrs[trainer.counters.env_step] = value
            set_lr(value)

        def counting_sync():
            nonlocal syncs
            syncs += 1
            sync()

        learner.act, learner.set_learning_rate, learner.sync_target = recording_act, recording_set_lr, counting_sync
        drive(trainer, env_steps)
        assert counters.env_step == env_steps
        # the optimizer steps with the last value the schedule set (the LR is a tensor shared with Adam)
        assert float(learner.optimizer.param_groups[0]["lr"]) == pytest.approx(lrs[max(lrs)])
    return epsilons, lrs, syncs


@pytest.mark.parametrize("schedule", ["linear", "step"])
def test_schedules_and_target_syncs_count_env_steps_not_vector_steps(tmp_path, tiny_cfg, schedule):
    """Steps are env steps, not vector steps: 1 env and 8 envs see the same epsilon and LR at the same env step,
    and as many target syncs."""
    total, interval = 800, 100
    cfg = classic(
        tiny_cfg,
        total_steps=total,
        learning_starts=96,
        train_every=8,
        epsilon_schedule=schedule,
        epsilon_decay_steps=200,
        lr_schedule="linear",
        target_update_interval=interval,
        batch_size=8,
        hidden_sizes=[8],
    )
    eps1, lr1, syncs1 = record_schedules(cfg, tmp_path / "one", total)
    eps8, lr8, syncs8 = record_schedules(cfg.updated(num_envs=8), tmp_path / "eight", total)
    assert len(eps1) == total and len(eps8) == total // 8
    assert sorted(eps8) == list(range(0, total, 8))
    for step, value in eps8.items():
        assert value == eps1[step] == epsilon_at(cfg, step)
    assert eps1[0] == 1.0 and eps1[total - 1] < 0.2  # it really decays over these env steps
    assert sorted(lr8) == sorted(lr1) and len(lr1) == (total - 96) // 8
    for step, value in lr8.items():
        assert value == lr1[step] == learning_rate_at(cfg, step)
    assert syncs1 == syncs8 == total // interval
