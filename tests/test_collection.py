"""The Collector on its own: envs, a replay, a learner and counters, without a trainer, a loop or a logger."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core_helpers import COUNTER_ENV, REWARD, classic
from fastdqn.collection import Collector
from fastdqn.counters import Counters
from fastdqn.envs import make_vector_env
from fastdqn.learner import DQNLearner
from fastdqn.replay import ReplayBuffer
from fastdqn.schedules import epsilon_at

CPU = torch.device("cpu")


def counter_collector(cfg) -> Collector:
    """A Collector of `cfg.num_envs` counter envs (obs [t, marker]) into a uniform replay."""
    replay = ReplayBuffer(cfg.buffer_size, cfg.num_envs, (2,), torch.float32, CPU)
    learner = DQNLearner(cfg, (2,), 2, CPU)
    return Collector(cfg, make_vector_env(cfg, cfg.num_envs), replay, learner, Counters(), CPU)


def test_collector_stores_true_transitions_and_counts_the_finished_episodes(tiny_cfg):
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=3, buffer_size=300, epsilon_decay_steps=150)
    collector = counter_collector(cfg)
    act, epsilons, finished = collector.learner.act, [], []
    collector.learner.act = lambda obs, epsilon, generator=None: (epsilons.append(epsilon), act(obs, epsilon))[1]
    try:
        for _ in range(100):
            finished += collector.collect()
    finally:
        collector.envs.close()
    assert collector.counters.env_step == 300 and collector.counters.episodes == len(finished) > 30
    assert epsilons == [epsilon_at(cfg, 3 * k) for k in range(100)]  # the schedule at each vector step's env step
    replay = collector.replay
    assert len(replay) == 300
    assert torch.equal(replay.next_obs[:, 0], replay.obs[:, 0] + 1)  # the true next obs, also at episode ends
    assert torch.equal(replay.next_obs[:, 1], replay.obs[:, 1])
    assert all(ret == pytest.approx(REWARD * length) for ret, length in finished)
    assert list(collector.recent_returns) == [ret for ret, _ in finished][-20:]
    assert collector.recent_return() == pytest.approx(np.mean([ret for ret, _ in finished][-20:]))


def test_collector_state_continues_the_envs_exactly(tiny_cfg):
    """A collector given another's state (and counters) stores the transitions the original goes on to store."""
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=2, buffer_size=100)
    collectors = []
    for _ in range(2):
        torch.manual_seed(0)  # the same network weights
        collectors.append(counter_collector(cfg))
    original, restored = collectors
    stored = []
    try:
        for _ in range(13):  # both envs mid-episode, out of phase
            original.collect()
        restored.load_state_dict(original.state_dict())
        restored.counters.load(vars(original.counters))
        assert list(restored.recent_returns) == list(original.recent_returns)
        rng = torch.get_rng_state()
        for collector in collectors:
            torch.set_rng_state(rng)  # the same action draws for both
            start = collector.replay.pos
            for _ in range(20):
                collector.collect()
            stored.append((collector.replay.obs[start : start + 40], collector.replay.next_obs[start : start + 40]))
    finally:
        for collector in collectors:
            collector.envs.close()
    assert torch.equal(stored[0][0], stored[1][0]) and torch.equal(stored[0][1], stored[1][1])


def test_collector_at_epsilon_1_steps_without_a_forward_pass(tiny_cfg):
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=3, epsilon_schedule="constant", epsilon_start=1.0)
    collector = counter_collector(cfg)
    collector.learner.q.forward = lambda *args: pytest.fail("a forward pass at epsilon 1")
    try:
        for _ in range(20):
            collector.collect()
    finally:
        collector.envs.close()
    assert collector.counters.env_step == 60 and len(collector.replay) == 60
