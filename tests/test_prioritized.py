"""Prioritized replay: sampling frequencies, importance weights, priority bookkeeping, the weighted loss, and a
short training run that actually reprioritizes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from compile_checks import assert_compiled
from fastdqn.config import Config
from fastdqn.learner import DQNLearner, td_loss
from fastdqn.prioritized import PrioritizedReplayBuffer, proportional_sample
from fastdqn.replay import Batch
from fastdqn.schedules import per_beta_at
from fastdqn.trainer import Trainer
from fastdqn.update_runner import make_update_runner

CPU = torch.device("cpu")


def filled_buffer(n: int = 8, alpha: float = 0.6, num_envs: int = 2) -> PrioritizedReplayBuffer:
    buf = PrioritizedReplayBuffer(n, num_envs, (1,), torch.float32, CPU, alpha=alpha, eps=0.01)
    for step in range(n // num_envs):
        obs = torch.arange(step * num_envs, (step + 1) * num_envs, dtype=torch.float32).unsqueeze(1)
        buf.add(obs, torch.zeros(num_envs, dtype=torch.int64), torch.zeros(num_envs), obs + 1, torch.zeros(num_envs))
    return buf


def test_sampling_frequencies_match_priorities():
    torch.manual_seed(0)
    priorities = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 0.5, 0.0001, 20.0])
    draws = 200_000
    idx = torch.cat([proportional_sample(priorities, 1_000, 1.0)[0] for _ in range(draws // 1_000)])
    freq = torch.bincount(idx, minlength=8).double() / draws
    expected = priorities.double() / priorities.sum()
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-6), (freq, expected)


def test_sampling_never_leaves_the_filled_slots():
    torch.manual_seed(1)
    idx, _ = proportional_sample(torch.tensor([0.3, 0.0001, 5.0]), 4_096, 0.4)
    assert int(idx.min()) >= 0 and int(idx.max()) <= 2


def test_importance_weights_against_hand_computed_values():
    priorities = torch.tensor([1.0, 2.0, 5.0])  # P = 1/8, 2/8, 5/8; N = 3
    beta = 0.5
    idx, weights = proportional_sample(priorities, 64, beta)
    hand = {i: (3 * p / 8) ** -beta / (3 * 1 / 8) ** -beta for i, p in enumerate([1.0, 2.0, 5.0])}
    # i.e. weight(i) = sqrt(p_min / p_i): 1, 0.7071, 0.4472
    assert hand[1] == pytest.approx(0.70710678) and hand[2] == pytest.approx(0.4472136)
    for i, w in zip(idx.tolist(), weights.tolist()):
        assert w == pytest.approx(hand[i], rel=1e-6)
    assert set(idx.tolist()) == {0, 1, 2}  # stratified: each slice of the total is visited


def test_new_transitions_get_the_max_priority_and_updates_use_abs_td_plus_eps():
    buf = filled_buffer(8, alpha=0.5)
    assert torch.equal(buf.priorities, torch.ones(8))  # the initial max priority is 1
    buf.update_priorities(torch.tensor([0, 3]), torch.tensor([-3.99, 15.99]))
    assert buf.priorities[0].item() == pytest.approx(2.0) and buf.priorities[3].item() == pytest.approx(4.0)
    assert buf.max_priority.item() == pytest.approx(4.0)
    buf.add(torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), torch.zeros(2), torch.zeros(2, 1), torch.zeros(2))
    assert buf.priorities[:2].tolist() == [pytest.approx(4.0)] * 2  # overwritten slots 0 and 1: new, at max
    buf.update_priorities(torch.tensor([1]), torch.tensor([0.0]))
    assert buf.priorities[1].item() == pytest.approx(0.1)  # (0 + eps) ** alpha, never 0
    assert buf.max_priority.item() == pytest.approx(4.0)  # the max never decreases


def test_sample_carries_weights_and_indices_and_the_sampled_transitions():
    torch.manual_seed(2)
    buf = filled_buffer(8)
    buf.beta = 0.7
    batch = buf.sample(16)
    assert batch.indices.shape == (16,) and batch.weights.shape == (16,)
    assert torch.equal(batch.obs[:, 0], batch.indices.float())  # obs of slot i is i
    assert torch.allclose(batch.weights, torch.ones(16))  # equal priorities: every weight is 1


def test_beta_anneals_linearly_to_its_end_value():
    cfg = Config(total_steps=1_000, per_beta_start=0.4, per_beta_end=1.0)
    assert [per_beta_at(cfg, s) for s in (0, 500, 1_000, 5_000)] == pytest.approx([0.4, 0.7, 1.0, 1.0])


def test_weighted_loss_is_the_mean_of_weight_times_loss():
    q, y = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.5, 3.0, -1.0])
    w = torch.tensor([1.0, 0.5, 0.25])
    huber = torch.tensor([0.125, 2.5, 0.5])
    assert td_loss(q, y, "huber", 1.0, w).item() == pytest.approx((w * huber).mean().item())
    assert td_loss(q, y, "mse", 1.0, w).item() == pytest.approx((w * y**2).mean().item())
    assert td_loss(q, y, "huber", 1.0, torch.ones(3)).item() == pytest.approx(td_loss(q, y, "huber", 1.0).item())


def test_learner_update_with_unit_weights_equals_the_unweighted_update_and_returns_td_errors():
    cfg = Config(hidden_sizes=[16], device="cpu", batch_size=8)
    torch.manual_seed(3)
    obs, next_obs = torch.randn(8, 4), torch.randn(8, 4)
    actions, rewards, term = torch.randint(0, 2, (8,)), torch.randn(8), (torch.rand(8) < 0.3).float()
    results = []
    for weights in (None, torch.ones(8)):
        torch.manual_seed(4)
        learner = DQNLearner(cfg, (4,), 2, CPU)
        q_before = learner.q(obs).gather(1, actions.unsqueeze(1)).squeeze(1).detach()
        y = rewards + cfg.gamma * (1 - term) * learner.target(next_obs).max(1).values.detach()
        stats, td = learner.step_on(Batch(obs, actions, rewards, next_obs, term, None, weights))
        assert torch.allclose(td, (y - q_before).abs())
        results.append((stats, [p.detach().clone() for p in learner.q.parameters()]))
    assert torch.allclose(results[0][0], results[1][0])
    assert all(torch.allclose(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_state_dict_round_trip_keeps_priorities():
    buf = filled_buffer(8)
    buf.update_priorities(torch.tensor([2, 5]), torch.tensor([7.0, 0.5]))
    other = PrioritizedReplayBuffer(8, 2, (1,), torch.float32, CPU, alpha=0.6, eps=0.01)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.priorities, buf.priorities) and torch.equal(other.max_priority, buf.max_priority)


@pytest.mark.slow
def test_training_with_prioritized_nstep_dueling_reprioritizes(tiny_cfg, tmp_path):
    cfg = tiny_cfg.updated(
        prioritized=True, n_step=3, dueling=True, total_steps=800, num_envs=2, train_every=4, gradient_steps=1
    )
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    result = trainer.run()
    assert result.updates == (800 - cfg.learning_starts) // cfg.train_every
    filled = trainer.replay.priorities[: len(trainer.replay)]
    assert filled.unique().numel() > 50  # priorities now follow |TD errors|, no longer all the initial 1
    assert trainer.replay.beta == pytest.approx(per_beta_at(cfg, 800)) == 1.0  # annealed to per_beta_end


@pytest.mark.slow
def test_compiled_update_matches_eager_with_weights_and_nstep_discounts():
    """The fast path sees the same loss, |TD errors| and new weights as eager on one weighted n-step batch."""
    torch.manual_seed(5)
    batch = Batch(
        torch.randn(16, 4),
        torch.randint(0, 2, (16,)),
        torch.randn(16),
        torch.randn(16, 4),
        (torch.rand(16) < 0.3).float(),
        discounts=0.99 ** torch.randint(1, 4, (16,)).float(),
        weights=torch.rand(16),
    )
    outputs = []
    for compiled in (False, True):
        torch.manual_seed(6)
        learner = DQNLearner(Config(hidden_sizes=[8], device="cpu", compile=compiled, double_dqn=True), (4,), 2, CPU)
        runner = make_update_runner(learner)
        with assert_compiled() if compiled else contextlib.nullcontext():
            stats = runner.update(batch)
        outputs.append((stats, runner.td_errors, [p.detach().clone() for p in learner.q.parameters()]))
    (s0, td0, p0), (s1, td1, p1) = outputs
    assert torch.allclose(s0, s1, atol=1e-5) and torch.allclose(td0, td1, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(p0, p1))
    torch.manual_seed(6)  # the same start without the weights and discounts: they change the loss on this batch
    plain = DQNLearner(Config(hidden_sizes=[8], device="cpu", double_dqn=True), (4,), 2, CPU)
    assert (
        abs(make_update_runner(plain).update(batch._replace(weights=None, discounts=None))[0].item() - s0[0].item())
        > 1e-3
    )
