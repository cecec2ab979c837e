"""TD targets and losses against hand-computed values; truncation bootstraps, termination does not."""

from __future__ import annotations

import pytest
import torch

from core_helpers import COUNTER_ENV, TIME_LIMIT, classic, drive, trainer_without_run
from fastdqn.learner import td_loss, td_targets

GAMMA = 0.9
REWARDS = torch.tensor([1.0, 2.0, -1.0, 0.5])
# transition 1 terminated; transition 2 was truncated by a time limit, which is stored as terminated = 0
TERMINATED = torch.tensor([0.0, 1.0, 0.0, 0.0])
NEXT_Q_TARGET = torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0], [-2.0, -1.0, -3.0], [0.0, 10.0, 7.0]])
NEXT_Q_ONLINE = torch.tensor(
    [
        [9.0, 0.0, 1.0],  # online argmax 0 (target max is at 1)
        [0.0, 0.0, 9.0],
        [0.0, 0.0, 9.0],  # online argmax 2 (target max is at 1)
        [0.0, 1.0, 0.0],
    ]
)


def test_dqn_targets_by_hand():
    y = td_targets(REWARDS, TERMINATED, GAMMA, NEXT_Q_TARGET)
    expected = [1.0 + 0.9 * 3.0, 2.0, -1.0 + 0.9 * -1.0, 0.5 + 0.9 * 10.0]
    assert y.tolist() == pytest.approx(expected)


def test_double_dqn_targets_by_hand():
    y = td_targets(REWARDS, TERMINATED, GAMMA, NEXT_Q_TARGET, NEXT_Q_ONLINE)
    # online net picks a', target net evaluates it
    expected = [1.0 + 0.9 * 1.0, 2.0, -1.0 + 0.9 * -3.0, 0.5 + 0.9 * 10.0]
    assert y.tolist() == pytest.approx(expected)


def test_gamma_zero_and_one():
    assert td_targets(REWARDS, TERMINATED, 0.0, NEXT_Q_TARGET).tolist() == pytest.approx(REWARDS.tolist())
    assert td_targets(REWARDS, TERMINATED, 1.0, NEXT_Q_TARGET).tolist() == pytest.approx([4.0, 2.0, -2.0, 10.5])


def test_targets_carry_no_gradient_into_the_target_values():
    next_q = NEXT_Q_TARGET.clone().requires_grad_(True)
    y = td_targets(REWARDS, TERMINATED, GAMMA, next_q)
    y.sum().backward()
    # d y / d next_q is gamma at each row's max, 0 for the terminated row: the formula, not a detached copy
    grad = next_q.grad
    assert grad[1].abs().sum() == 0
    assert grad[0].tolist() == pytest.approx([0.0, 0.9, 0.0])


def test_huber_loss_by_hand():
    q = torch.tensor([0.0, 0.0, 1.0])
    y = torch.tensor([0.5, 3.0, -1.0])  # errors 0.5 (quadratic), 3 and 2 (linear for delta 1)
    # delta 1: 0.5 * 0.5^2, 1 * (3 - 0.5), 1 * (2 - 0.5)
    assert td_loss(q, y, "huber", 1.0).item() == pytest.approx((0.125 + 2.5 + 1.5) / 3)
    # delta 2: 0.5 * 0.5^2, 2 * (3 - 1), 0.5 * 2^2
    assert td_loss(q, y, "huber", 2.0).item() == pytest.approx((0.125 + 4.0 + 2.0) / 3)


def test_mse_loss_by_hand():
    q = torch.tensor([0.0, 0.0, 1.0])
    y = torch.tensor([0.5, 3.0, -1.0])
    assert td_loss(q, y, "mse", 1.0).item() == pytest.approx((0.25 + 9.0 + 4.0) / 3)


def test_truncated_transition_bootstraps_terminal_one_does_not(tmp_path, tiny_cfg):
    """A time-limit truncation bootstraps from the true final observation, a termination does not, through
    the real path: time-limited counter env, reward 2.5 per step."""
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=2, buffer_size=200, learning_starts=10_000, gamma=0.9)
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 200)
        buf, learner = trainer.replay, trainer.learner
        next_t = buf.next_obs[:, 0]
        truncated = next_t == TIME_LIMIT  # reached the 4-step limit (or terminated there, terminate_at = 4)
        terminal = buf.terminated == 1
        # terminate_at is drawn in [2, 6]: a terminal next state has t in 2..4, and the episodes with terminate_at 5
        # or 6 are cut by the time limit at t = 4, stored as not terminated
        assert set(next_t[terminal].tolist()) <= {2.0, 3.0, 4.0}
        cut = truncated & ~terminal
        assert terminal.sum() > 5 and cut.sum() > 5
        with torch.no_grad():
            next_q = learner.target(buf.next_obs)
            y = td_targets(buf.rewards, buf.terminated, cfg.gamma, next_q)
            q = learner.q(buf.obs).gather(1, buf.actions.unsqueeze(1)).squeeze(1)
        max_next_q = next_q.max(dim=1).values
        assert torch.allclose(y[cut], 2.5 + 0.9 * max_next_q[cut])
        assert torch.allclose(y[terminal], torch.full_like(y[terminal], 2.5))
        # and the run's own update bootstraps exactly the truncated transitions
        only_cut = buf.gather(cut.nonzero().squeeze(1))
        bootstrapped = td_loss(q[cut], 2.5 + 0.9 * max_next_q[cut], cfg.loss, cfg.huber_delta)
        assert trainer.updates.update(only_cut)[0].item() == pytest.approx(bootstrapped.item(), rel=1e-5)
