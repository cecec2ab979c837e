"""ReplayBuffer: layout, wraparound, uniform sampling on the device, uint8 storage, state round trip."""

from __future__ import annotations

import pytest
import torch

from core_helpers import COUNTER_ENV, COUNTER_ENV_U8, classic, drive, trainer_without_run
from fastdqn.nstep import nstep_returns
from fastdqn.replay import ReplayBuffer

CPU = torch.device("cpu")


def add_counter_steps(buf: ReplayBuffer, first: int, vector_steps: int) -> int:
    """Add vector steps whose obs are consecutive counters (slot order); next_obs = obs + 1. Returns next counter."""
    n = buf.num_envs
    value = first
    for _ in range(vector_steps):
        obs = torch.arange(value, value + n, dtype=torch.float32).unsqueeze(1)
        buf.add(obs, torch.arange(n) % 3, obs.squeeze(1) * 0.5, obs + 1, torch.zeros(n))
        value += n
    return value


def test_capacity_is_rounded_up_to_whole_vector_steps():
    assert ReplayBuffer(10, 4, (1,), torch.float32, CPU).capacity == 12
    assert ReplayBuffer(12, 4, (1,), torch.float32, CPU).capacity == 12
    assert ReplayBuffer(7, 1, (1,), torch.float32, CPU).capacity == 7
    assert ReplayBuffer(1, 8, (1,), torch.float32, CPU).capacity == 8


def test_add_rejects_a_step_of_the_wrong_width():
    buf = ReplayBuffer(8, 4, (1,), torch.float32, CPU)
    with pytest.raises(ValueError, match=r"\(4\)"):
        buf.add(torch.zeros(3, 1), torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3))


def test_wraparound_overwrites_the_oldest_in_order():
    buf = ReplayBuffer(12, 4, (1,), torch.float32, CPU)
    add_counter_steps(buf, 1, 2)  # counters 1..8
    assert (len(buf), buf.pos) == (8, 8)
    assert buf.obs[:8, 0].tolist() == list(range(1, 9)) and buf.obs[8:, 0].tolist() == [0] * 4
    add_counter_steps(buf, 9, 3)  # counters 9..20: 9..12 fill the end, 13..20 overwrite 1..8
    assert (len(buf), buf.pos) == (12, 8)
    assert buf.obs[:, 0].tolist() == [13, 14, 15, 16, 17, 18, 19, 20, 9, 10, 11, 12]
    # every field moved together: actions, rewards and next_obs still belong to the obs in their slot
    assert torch.equal(buf.next_obs, buf.obs + 1)
    assert torch.equal(buf.rewards, buf.obs[:, 0] * 0.5)
    assert buf.actions.tolist() == [0, 1, 2, 0] * 3
    # the survivors are exactly the newest `capacity` transitions
    assert sorted(buf.obs[:, 0].tolist()) == list(range(9, 21))


def test_same_env_next_transition_is_num_envs_slots_later():
    n = 3
    buf = ReplayBuffer(9, n, (1,), torch.float32, CPU)
    for step in range(5):  # env e's obs = 100 * e + step
        obs = torch.tensor([[100.0 * e + step] for e in range(n)])
        buf.add(obs, torch.zeros(n, dtype=torch.int64), torch.zeros(n), obs + 1, torch.zeros(n))
    for slot in range(buf.capacity):
        assert int(buf.obs[slot, 0]) // 100 == slot % n  # slot k*N + e belongs to env e


def test_sampled_indices_are_valid_on_a_partly_filled_buffer():
    torch.manual_seed(0)
    buf = ReplayBuffer(100, 1, (1,), torch.float32, CPU)
    add_counter_steps(buf, 1, 37)  # obs 1..37 in slots 0..36; empty slots hold 0
    batch = buf.sample(5_000)
    values = batch.obs[:, 0]
    assert values.min() >= 1 and values.max() <= 37
    assert torch.unique(values).numel() == 37  # every filled slot is reachable
    assert batch.obs.shape == (5_000, 1) and batch.actions.dtype == torch.int64
    assert batch.rewards.dtype == torch.float32 and batch.terminated.dtype == torch.float32


def test_sampling_is_uniform_over_slots():
    torch.manual_seed(1)
    slots, draws = 100, 100_000
    buf = ReplayBuffer(slots, 4, (1,), torch.float32, CPU)
    add_counter_steps(buf, 0, 40)  # 160 counters: wrapped, every slot filled
    counts = torch.bincount(buf.sample(draws).obs[:, 0].long() % slots, minlength=slots).double()
    expected = draws / slots
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square with 99 degrees of freedom: mean 99, std 14; a biased sampler lands far above 200
    assert chi2 < 200, chi2
    assert counts.min() > 0.8 * expected and counts.max() < 1.2 * expected


def test_sample_draws_indices_on_the_buffers_device(monkeypatch):
    buf = ReplayBuffer(8, 1, (1,), torch.float32, CPU)
    add_counter_steps(buf, 1, 8)
    seen = {}
    real_randint = torch.randint

    def recording_randint(*args, **kwargs):
        seen.update(kwargs)
        return real_randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", recording_randint)
    buf.sample(4)
    assert seen.get("device") == CPU


def test_uint8_observations_stay_uint8_on_the_device():
    buf = ReplayBuffer(16, 2, (3,), torch.uint8, CPU)
    obs = torch.tensor([[0, 128, 255], [1, 2, 3]], dtype=torch.uint8)
    for _ in range(3):
        buf.add(obs, torch.tensor([0, 1]), torch.ones(2), obs, torch.zeros(2))
    assert buf.obs.dtype == torch.uint8 and buf.next_obs.dtype == torch.uint8
    assert buf.obs.device == CPU
    batch = buf.sample(64)
    assert batch.obs.dtype == torch.uint8 and batch.next_obs.dtype == torch.uint8
    assert set(map(tuple, batch.obs.tolist())) <= {(0, 128, 255), (1, 2, 3)}  # no value was rescaled
    assert buf.nbytes < ReplayBuffer(16, 2, (3,), torch.float32, CPU).nbytes


def test_trainer_stores_a_uint8_env_as_uint8(tmp_path, tiny_cfg):
    cfg = classic(
        tiny_cfg, env_id=COUNTER_ENV_U8, num_envs=2, learning_starts=8, batch_size=8, buffer_size=64, train_every=2
    )
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 40)  # includes gradient updates on uint8 batches
        assert trainer.replay.obs.dtype == torch.uint8 and trainer.replay.next_obs.dtype == torch.uint8
        assert trainer.counters.updates > 0
        batch = trainer.replay.sample(16)
        assert batch.obs.dtype == torch.uint8
        assert torch.isfinite(trainer.learner.q(batch.obs)).all()


def test_sampled_next_obs_follows_obs_after_wraparound(tmp_path, tiny_cfg):
    """Replay wraparound: fill far past capacity through the real collect path; every sample is a true transition."""
    torch.manual_seed(0)
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=2, buffer_size=22, batch_size=16, learning_starts=10_000)
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 300)
        buf = trainer.replay
        assert buf.capacity == 22 and len(buf) == 22 and buf.pos == 300 % 22
        batch = buf.sample(2_000)
    t, marker = batch.obs[:, 0], batch.obs[:, 1]
    next_t, next_marker = batch.next_obs[:, 0], batch.next_obs[:, 1]
    assert torch.equal(next_t, t + 1)  # the final obs of an ended episode also counts one step on
    assert torch.equal(next_marker, marker)  # never a transition into another episode
    assert torch.equal(batch.rewards, torch.full_like(batch.rewards, 2.5))


def test_state_dict_round_trip_continues_identically():
    src = ReplayBuffer(12, 4, (1,), torch.float32, CPU)
    nxt = add_counter_steps(src, 1, 5)  # wrapped: pos 8, size 12
    state = src.state_dict()
    assert all(not isinstance(v, torch.Tensor) or v.shape[0] == 12 for v in state.values())
    dst = ReplayBuffer(12, 4, (1,), torch.float32, CPU)
    dst.load_state_dict(state)
    assert (dst.pos, dst.size) == (src.pos, src.size) == (8, 12)
    for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
        assert torch.equal(getattr(dst, name), getattr(src, name)), name
    add_counter_steps(src, nxt, 1)
    add_counter_steps(dst, nxt, 1)  # the write head continues where it stopped
    assert torch.equal(dst.obs, src.obs) and dst.pos == src.pos == 0
    # the state is a copy: the write above (counters 21..24 into slots 8..11) did not change it
    assert src.obs[8, 0] == 21 and state["obs"][8, 0] == 9


def test_state_dict_of_a_partly_filled_buffer_holds_only_the_filled_part():
    src = ReplayBuffer(20, 2, (1,), torch.float32, CPU)
    add_counter_steps(src, 1, 3)
    state = src.state_dict()
    assert state["obs"].shape[0] == 6 and state["size"] == 6 and state["pos"] == 6
    dst = ReplayBuffer(20, 2, (1,), torch.float32, CPU)
    dst.load_state_dict(state)
    assert dst.obs[:6, 0].tolist() == [1, 2, 3, 4, 5, 6] and len(dst) == 6
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4, 2, (1,), torch.float32, CPU).load_state_dict(state)


def test_graph_sample_reads_the_fill_level_from_the_device_and_covers_the_filled_slots():
    """The sampler a CUDA graph captures: uniform over the filled slots as the buffer grows, through `filled`."""
    torch.manual_seed(2)
    buf = ReplayBuffer(100, 1, (1,), torch.float32, CPU)
    add_counter_steps(buf, 1, 5)  # obs 1..5
    assert buf.filled.item() == 5 and buf.graph_sampling
    values = buf.graph_sample(5_000).obs[:, 0].long()
    assert values.min() == 1 and values.max() == 5
    counts = torch.bincount(values, minlength=6)[1:].double()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03  # uniform
    add_counter_steps(buf, 6, 45)  # obs 1..50: the same sampler now reaches the new slots
    values = buf.graph_sample(5_000).obs[:, 0]
    assert values.min() == 1 and values.max() == 50 and torch.unique(values).numel() == 50
    one = ReplayBuffer(4, 1, (1,), torch.float32, CPU)
    add_counter_steps(one, 7, 1)
    assert one.graph_sample(100).obs.eq(7).all()  # rand's rare 1.0 is clamped into the filled slots
    restored = ReplayBuffer(100, 1, (1,), torch.float32, CPU)
    restored.load_state_dict(buf.state_dict())  # a resume restores the device-side fill level too
    assert restored.filled.item() == 50


def test_nstep_graph_sample_reads_the_write_head_from_the_device():
    """n-step returns stop at the write head; a captured sampler must see where it is now, not at capture."""
    buf = ReplayBuffer(12, 2, (1,), torch.float32, CPU, n_step=3, gamma=0.5)
    assert buf.graph_sampling
    for step in range(9):  # wraps: 18 slots written into 12
        buf.add(
            torch.full((2, 1), float(step)),
            torch.zeros(2, dtype=torch.int64),
            torch.ones(2),
            torch.full((2, 1), step + 1.0),
            torch.zeros(2),
        )
        assert buf.head.item() == buf.pos
        idx = torch.arange(buf.size)
        on_device = buf.gather(idx)
        on_host = nstep_returns(buf.rewards, buf.terminated, buf.truncated, idx, buf.pos, 2, 3, 0.5)
        torch.testing.assert_close(on_device.rewards, on_host[0], rtol=0, atol=0)
        torch.testing.assert_close(on_device.discounts, on_host[2], rtol=0, atol=0)
    newest = buf.gather(torch.remainder(torch.tensor([buf.pos - 2]), buf.capacity))
    assert newest.rewards.item() == 1.0 and newest.discounts.item() == 0.5, "the newest step has nothing after it"
    restored = ReplayBuffer(12, 2, (1,), torch.float32, CPU, n_step=3, gamma=0.5)
    restored.load_state_dict(buf.state_dict())
    assert restored.head.item() == buf.pos
