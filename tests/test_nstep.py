"""n-step returns: hand-computed targets across terminated, truncated, env and write-head boundaries, and a
brute-force reference over a long random history that wraps the buffer several times."""

from __future__ import annotations

import random

import pytest
import torch

from fastdqn.config import Config
from fastdqn.learner import td_targets
from fastdqn.nstep import nstep_returns
from fastdqn.replay import ReplayBuffer

CPU = torch.device("cpu")


def add_step(buf: ReplayBuffer, obs: list[float], rewards: list[float], term: list[int], trunc: list[int]) -> None:
    n = buf.num_envs
    o = torch.tensor(obs, dtype=torch.float32).unsqueeze(1)
    buf.add(
        o,
        torch.zeros(n, dtype=torch.int64),
        torch.tensor(rewards, dtype=torch.float32),
        o + 0.5,
        torch.tensor(term, dtype=torch.float32),
        torch.tensor(trunc, dtype=torch.float32),
    )


@pytest.fixture
def two_env_buffer() -> ReplayBuffer:
    """2 envs, 4 vector steps, n = 3, gamma = 0.5.

    env 0: rewards 1, 2, 4, 8, no episode end.
    env 1: rewards 1, 2 (terminated), 4, 8 (truncated).
    Slot 2t + e holds env e's step t; obs = 10 * e + t.
    """
    buf = ReplayBuffer(8, 2, (1,), torch.float32, CPU, n_step=3, gamma=0.5)
    rewards = [1.0, 2.0, 4.0, 8.0]
    for t in range(4):
        add_step(buf, [t, 10 + t], [rewards[t], rewards[t]], [0, int(t == 1)], [0, int(t == 3)])
    return buf


def check(buf: ReplayBuffer, slot: int, ret: float, next_obs: float, terminated: float, discount: float) -> None:
    batch = buf.gather(torch.tensor([slot]))
    assert batch.rewards.item() == pytest.approx(ret)
    assert batch.next_obs.item() == pytest.approx(next_obs)
    assert batch.terminated.item() == terminated
    assert batch.discounts.item() == pytest.approx(discount)
    assert batch.obs.item() == buf.obs[slot].item()  # the start state and action are the sampled slot's


def test_full_n_steps_inside_one_env(two_env_buffer):
    # env 0 step 0: 1 + 0.5 * 2 + 0.25 * 4; bootstrap from the next_obs of step 2 with 0.5^3
    check(two_env_buffer, 0, 3.0, 2.5, 0.0, 0.125)


def test_cut_at_terminated_no_bootstrap(two_env_buffer):
    # env 1 step 0: its episode terminates at step 1: 1 + 0.5 * 2, terminated, nothing of step 2 (next episode)
    check(two_env_buffer, 1, 2.0, 11.5, 1.0, 0.25)
    batch = two_env_buffer.gather(torch.tensor([1]))
    y = td_targets(batch.rewards, batch.terminated, batch.discounts, torch.full((1, 2), 100.0))
    assert y.item() == pytest.approx(2.0)  # no bootstrap at all


def test_cut_at_truncated_bootstraps_from_the_final_obs(two_env_buffer):
    # env 1 step 2 (a new episode): 4 + 0.5 * 8, truncated at step 3 -> bootstrap from its final obs with 0.5^2
    check(two_env_buffer, 5, 8.0, 13.5, 0.0, 0.25)
    batch = two_env_buffer.gather(torch.tensor([5]))
    y = td_targets(batch.rewards, batch.terminated, batch.discounts, torch.tensor([[100.0, 40.0]]))
    assert y.item() == pytest.approx(8.0 + 0.25 * 100.0)


def test_never_reads_past_the_write_head(two_env_buffer):
    # env 0 step 2: only step 3 is newer; the slot after it (the write head, step 0) is older data
    check(two_env_buffer, 4, 4.0 + 0.5 * 8.0, 3.5, 0.0, 0.25)
    # env 0 step 3 is the newest transition: a one-step return
    check(two_env_buffer, 6, 8.0, 3.5, 0.0, 0.5)


def test_chain_wraps_around_the_end_of_the_buffer(two_env_buffer):
    buf = two_env_buffer
    add_step(buf, [4, 14], [16.0, 16.0], [0, 0], [0, 0])  # overwrites slots 0 and 1, write head now at slot 2
    # env 0 step 3 (slot 6) continues into step 4 (slot 0) and stops there: slot 2 is the oldest, step 1
    check(buf, 6, 8.0 + 0.5 * 16.0, 4.5, 0.0, 0.25)
    # env 0 step 1 (slot 2, now the oldest) reads steps 2 and 3 in slots 4 and 6
    check(buf, 2, 2.0 + 0.5 * 4.0 + 0.25 * 8.0, 3.5, 0.0, 0.125)


def test_one_step_buffer_returns_plain_transitions(two_env_buffer):
    plain = ReplayBuffer(8, 2, (1,), torch.float32, CPU)
    for t in range(4):
        add_step(plain, [t, 10 + t], [1.0, 1.0], [0, 0], [0, 0])
    batch = plain.gather(torch.arange(8))
    assert batch.discounts is None and torch.equal(batch.next_obs, batch.obs + 0.5)


def reference_returns(history: list[list[tuple]], latest: int, t: int, e: int, n: int, gamma: float):
    """Brute force over the time-ordered history of env e: (return, bootstrap obs, terminated, k)."""
    ret, k = 0.0, 0
    for j in range(n):
        if t + j > latest:
            break
        obs, r, term, trunc, next_obs = history[t + j][e]
        ret += gamma**j * r
        k, last_next, last_term = j + 1, next_obs, term
        if term or trunc:
            break
    return ret, last_next, last_term, gamma**k


@pytest.mark.parametrize("num_envs,capacity,n", [(1, 7, 3), (3, 12, 4), (4, 16, 2)])
def test_matches_a_brute_force_reference_over_a_wrapping_history(num_envs, capacity, n):
    gamma, rng = 0.9, random.Random(num_envs * 100 + n)
    buf = ReplayBuffer(capacity, num_envs, (1,), torch.float32, CPU, n_step=n, gamma=gamma)
    history: list[list[tuple]] = []
    for t in range(5 * capacity // num_envs + 3):
        step = []
        for e in range(num_envs):
            term = int(rng.random() < 0.15)
            trunc = int(not term and rng.random() < 0.1)
            step.append((1000.0 * e + t, rng.uniform(-1, 1), term, trunc, 1000.0 * e + t + 0.5))
        history.append(step)
        obs, r, term, trunc, nxt = zip(*step)
        buf.add(
            torch.tensor(obs).unsqueeze(1),
            torch.zeros(num_envs, dtype=torch.int64),
            torch.tensor(r),
            torch.tensor(nxt).unsqueeze(1),
            torch.tensor(term, dtype=torch.float32),
            torch.tensor(trunc, dtype=torch.float32),
        )
        if t < 2:
            continue
        batch = buf.gather(torch.arange(len(buf)))
        for slot in range(len(buf)):
            start = int(batch.obs[slot].item())
            e, ts = divmod(start, 1000)
            ret, nxt_obs, term, disc = reference_returns(history, t, ts, e, n, gamma)
            assert batch.rewards[slot].item() == pytest.approx(ret, abs=1e-5)
            assert batch.next_obs[slot].item() == nxt_obs  # same env, never past an episode end or the head
            assert batch.terminated[slot].item() == term
            assert batch.discounts[slot].item() == pytest.approx(disc)


def test_nstep_returns_on_raw_columns_match_hand_values():
    # one env, capacity 4, write head at 0 (full): slots 0..3 are steps 0..3 in order
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    none = torch.zeros(4)
    ret, last, disc = nstep_returns(rewards, none, none, torch.tensor([0, 2, 3]), 4, 1, 3, 0.5)
    assert ret.tolist() == [1.75, 1.5, 1.0] and last.tolist() == [2, 3, 3] and disc.tolist() == [0.125, 0.25, 0.5]


def test_config_rejects_bad_n_step_and_no_replay_combination():
    from fastdqn.errors import ConfigError

    with pytest.raises(ConfigError, match="n_step"):
        Config(n_step=0).validate()
    with pytest.raises(ConfigError, match="n_step > 1"):
        Config(
            replay_buffer=False, num_envs=1, buffer_size=1, batch_size=1, train_every=1, gradient_steps=1, n_step=3
        ).validate()


def test_trainer_nstep_batches_on_a_counter_env_stay_inside_one_episode(tmp_path, tiny_cfg):
    """Real vector envs out of phase, terminations and 4-step time limits, a wrapped buffer: every n-step
    transition the trainer's buffer yields sums k rewards of one episode and bootstraps from that episode's
    observation k steps later (k < n only at an episode end or at the write head)."""
    from core_helpers import COUNTER_ENV, REWARD, drive, trainer_without_run

    gamma, n = 0.9, 3
    cfg = tiny_cfg.updated(
        env_id=COUNTER_ENV, num_envs=3, n_step=n, gamma=gamma, buffer_size=30, batch_size=8, learning_starts=10_000
    )
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 100)  # about three times round the 30-slot buffer
        batch = trainer.replay.gather(torch.arange(len(trainer.replay)))
    k = torch.round(torch.log(batch.discounts) / torch.log(torch.tensor(gamma))).long()
    assert k.min() >= 1 and k.max() == n
    t, marker = batch.obs[:, 0], batch.obs[:, 1]
    assert torch.equal(batch.next_obs[:, 0], t + k)  # k steps later ...
    assert torch.equal(batch.next_obs[:, 1], marker)  # ... in the same episode
    expected = REWARD * (1 - gamma ** k.float()) / (1 - gamma)
    assert torch.allclose(batch.rewards, expected)
    short = k < n
    ends = (batch.terminated == 1) | (batch.next_obs[:, 0] == 4)  # terminated, or truncated by the 4-step limit
    newest = torch.remainder(trainer.replay.pos - 1 - torch.arange(len(trainer.replay)), 30) // 3 < n - 1
    assert torch.all(ends[short] | newest[short])  # shorter chains only at an episode end or the write head
    assert (short & ends & (batch.terminated == 0)).any()  # a truncated chain that bootstraps is in there
