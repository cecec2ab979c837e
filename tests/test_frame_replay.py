"""FrameReplay: each frame stored once, stacks rebuilt at sample time exactly as the envs built them.

Two references: a frame-id pixel env whose every frame says which env, episode and step it is (a stack
holds one episode plus zero start padding, never an overwritten frame), and a recording of ale-py's own
stacks across resets, lost lives, interleaved envs and several buffer wraparounds.
"""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

from core_helpers import trainer_without_run
from fastdqn.collection import Collector
from fastdqn.config import Config
from fastdqn.counters import Counters
from fastdqn.envs import make_vector_env
from fastdqn.errors import ConfigError
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner
from fastdqn.memory import check_replay_fits
from fastdqn.replay import ReplayBuffer

FRAME_ID_ENV = "fastdqn_test/FrameId-v0"
TIME_LIMIT = 5
_episode_ids = itertools.count()


class FrameIdEnv(gym.Env):
    """84x84 uint8 screens: row 0 = episode id (1..255), row 1 = t + 1, row 2 = last action + 1, row 3 = terminated.

    Episodes terminate at a random step in [1, 6] (some run into the 5-step time limit first); reward = t.
    """

    observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def _screen(self, action: int, terminated: bool) -> np.ndarray:
        screen = np.zeros((84, 84), np.uint8)
        screen[0], screen[1], screen[2], screen[3] = self.episode, self.t + 1, action + 1, terminated
        return screen

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode = next(_episode_ids) % 255 + 1
        self.t, self.terminate_at = 0, int(self.np_random.integers(1, 7))
        return self._screen(-1, False), {}

    def step(self, action):
        self.t += 1
        terminated = self.t >= self.terminate_at
        return self._screen(int(action), terminated), float(self.t), terminated, False, {}


if FRAME_ID_ENV not in gym.registry:
    gym.register(id=FRAME_ID_ENV, entry_point=FrameIdEnv, max_episode_steps=TIME_LIMIT)


def frame_id_cfg(**kw) -> Config:
    values = dict(
        env_id=FRAME_ID_ENV,
        num_envs=3,
        buffer_size=3 * 12,
        learning_starts=10**9,
        batch_size=8,
        eval_every=0,
        checkpoint_every=0,
        device="cpu",
        clip_rewards=False,
        n_step=1,
    )  # frame replay: 1-step
    return Config(**{**values, **kw})


def test_bytes_per_transition_and_a_million_transitions():
    replay = FrameReplay(1000, 4, (84, 84), 4, torch.device("cpu"))
    assert replay.nbytes / replay.capacity <= 84 * 84 + 32
    million = FrameReplay(1_000_000, 16, (84, 84), 4, torch.device("meta"))
    assert million.nbytes <= 7.1e9
    for dtype, size in ((torch.uint8, 56.4e9), (torch.float32, 225.7e9)):  # obs + next_obs stacks instead
        assert ReplayBuffer(1_000_000, 16, (4, 84, 84), dtype, torch.device("meta")).nbytes >= size


def test_collector_alone_stores_the_reset_frames_first_then_one_frame_per_env():
    """The Collector on its own (no trainer, no logger): a first row of episode starts, then each newest frame."""
    cfg = frame_id_cfg()
    cpu = torch.device("cpu")
    replay = FrameReplay(cfg.buffer_size, cfg.num_envs, (84, 84), cfg.frame_stack, cpu)
    collector = Collector(
        cfg, make_vector_env(cfg, cfg.num_envs), replay, DQNLearner(cfg, (4, 84, 84), 3, cpu), Counters(), cpu
    )
    newest = []
    try:
        for _ in range(2):
            newest.append(torch.from_numpy(collector.obs[:, -1].copy()))
            collector.collect()
    finally:
        collector.envs.close()
    assert len(replay) == 3 * 3 and collector.counters.env_step == 2 * 3
    assert replay.starts[:3].all() and not replay.starts[3:6].any()  # reset frames, then the first transitions
    assert torch.equal(replay.frames[:3], newest[0]) and torch.equal(replay.frames[3:6], newest[1])
    assert (replay.frames[:3, 1, 0] == 1).all() and (replay.frames[3:6, 1, 0] == 2).all()  # t = 0, then t = 1


def test_stacks_hold_one_episode_with_zero_padding_and_no_overwritten_frame(tmp_path):
    cfg = frame_id_cfg()
    with trainer_without_run(cfg, tmp_path) as trainer:
        replay = trainer.replay
        assert isinstance(replay, FrameReplay) and replay.frames.dtype == torch.uint8
        newest = lambda: [(int(o[-1, 0, 0]), int(o[-1, 1, 0]) - 1) for o in trainer.collector.obs]  # noqa: E731
        history = [newest()]  # (episode, t) of each env's newest frame, one entry per stored row
        truncated_seen = 0
        for step in range(150):
            trainer.collector.collect()
            history.append(newest())
            if step % 10 != 9:
                continue
            window = {frame for row in history[-replay.rows :] for frame in row}
            batch = replay.sample(256)
            for i in range(256):
                obs, nxt = batch.obs[i].numpy(), batch.next_obs[i].numpy()
                episode, t = int(nxt[-1, 0, 0]), int(nxt[-1, 1, 0]) - 1
                assert t >= 1, "a reset observation ends no transition"
                assert (episode, t) in window, "sampled a frame the buffer has overwritten"
                stacks = np.concatenate([obs, nxt[-1:]])  # frames of steps t-4 .. t
                for k, frame in enumerate(stacks):
                    step_t = t - 4 + k
                    if step_t < 0:
                        assert not frame.any(), "frames before the episode's first must be zero padding"
                    else:
                        assert (frame[0, 0], frame[1, 0]) == (episode, step_t + 1), "stack mixes episodes"
                assert (nxt[:3] == obs[1:]).all()
                assert int(batch.actions[i]) == int(nxt[-1, 2, 0]) - 1
                assert float(batch.rewards[i]) == t
                assert float(batch.terminated[i]) == float(nxt[-1, 3, 0])
                truncated_seen += int(t == TIME_LIMIT and not batch.terminated[i])
        assert truncated_seen > 0, "time-limited transitions bootstrap from their true final frame"


def test_sampled_transitions_equal_the_ale_stacks(tmp_path):
    """Record ale-py's own (obs, action, next obs) stacks; every sample must be one of those still stored."""
    cfg = frame_id_cfg(
        env_id="ALE/Breakout-v5", buffer_size=3 * 25, max_episode_steps=30, episodic_life=True, overlap="never"
    )  # the envs step through envs.step, which the test records
    with trainer_without_run(cfg, tmp_path) as trainer:
        recorded: list[list] = []  # per vector step: ((obs bytes, next obs bytes), action) of its transitions
        step_envs = trainer.envs.step
        was_done = np.zeros(cfg.num_envs, bool)

        def recording_step(actions):
            nonlocal was_done
            before = trainer.collector.obs.copy()
            out = step_envs(actions)
            nxt, _, terminated, truncated, _ = out
            recorded.append(
                [
                    ((before[e].tobytes(), nxt[e].tobytes()), int(actions[e]))
                    for e in range(cfg.num_envs)
                    if not was_done[e]
                ]
            )
            was_done = terminated | truncated
            return out

        trainer.envs.step = recording_step
        lives_lost = 0
        for step in range(160):
            trainer.collector.collect()
            if step % 40 == 39:
                rows = trainer.replay.rows
                # Stored rows: the last `rows` vector steps; transitions of the oldest `stack` rows are not sampled.
                valid: dict[tuple[bytes, bytes], set[int]] = {}
                for key, action in itertools.chain(*recorded[-(rows - cfg.frame_stack) :]):
                    valid.setdefault(key, set()).add(action)
                batch = trainer.replay.sample(2048)
                sampled = set()
                for i in range(2048):
                    key = (batch.obs[i].numpy().tobytes(), batch.next_obs[i].numpy().tobytes())
                    assert key in valid, "sampled stacks differ from every stack the env produced"
                    assert int(batch.actions[i]) in valid[key]
                    sampled.add(key)
                    lives_lost += int(batch.terminated[i])
                assert sampled == set(valid), "some stored transitions are never sampled"
        assert lives_lost > 0


def test_episodes_of_one_step_many_starts():
    """Half the slots are starts (reset, terminal step, reset, ...): samples are still only real transitions."""
    n, replay = 2, FrameReplay(2 * 10, 2, (1,), 2, torch.device("cpu"))
    replay.add_resets(torch.tensor([[1], [101]], dtype=torch.uint8))
    for k in range(1, 30):
        frame = torch.tensor([[k + 1], [k + 101]], dtype=torch.uint8)
        start = torch.full((n,), k % 2 == 0)
        replay.add(frame, torch.zeros(n, dtype=torch.int64), torch.ones(n), (~start).to(torch.uint8), start)
    batch = replay.sample(4096)
    # Reset frames are odd, terminal frames even; each transition is reset f -> terminal f + 1: obs [0, f].
    f = batch.next_obs[:, 0, 0].long()
    assert (f % 2 == 1).all(), "a start slot (odd frame) ends no transition"
    assert (batch.obs[:, 0, 0] == 0).all() and (batch.obs[:, 1, 0].long() == f).all()
    assert (batch.next_obs[:, 1, 0].long() == f + 1).all() and (batch.terminated == 1).all()
    # 30 rows written into 10: rows 20..29 are stored; the oldest 2 (the stack) are not sampled.
    assert set(f.tolist()) == {23, 25, 27, 29, 123, 125, 127, 129}


def test_two_starts_in_a_row_at_a_resume_are_never_sampled():
    """A resume stores fresh reset frames right after a natural reset: two start slots in a row for that env."""
    replay = FrameReplay(1 * 12, 1, (1,), 2, torch.device("cpu"))
    one, zero = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    # rows: reset, step, terminal step, reset, resume reset, step, step, terminal, reset, resume reset, step
    starts = [1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0]
    for k, start in enumerate(starts):
        replay.add(
            torch.full((1, 1), k + 1, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.int64),
            torch.ones(1),
            zero.to(torch.uint8),
            one if start else zero,
        )
    batch = replay.sample(20_000)
    newest = batch.next_obs[:, -1, 0].long() - 1  # the row each sampled transition ends at
    valid = {k for k, start in enumerate(starts) if not start and k >= 1}
    assert set(newest.tolist()) == valid
    assert (batch.next_obs[:, 0, 0].long() == newest).all()  # row k-1's frame (k) precedes row k's
    after_start = torch.tensor([bool(starts[k - 1]) for k in newest.tolist()])
    assert (batch.obs[:, 0, 0].long() == torch.where(after_start, 0, newest - 1)).all()  # zero-padded after a start


def test_state_dict_round_trip(tmp_path):
    with trainer_without_run(frame_id_cfg(), tmp_path) as trainer:
        for _ in range(40):
            trainer.collector.collect()
        state = trainer.replay.state_dict()
        copy = FrameReplay(trainer.cfg.buffer_size, 3, (84, 84), 4, torch.device("cpu"))
        copy.load_state_dict(state)
        torch.manual_seed(0)
        a = trainer.replay.sample(64)
        torch.manual_seed(0)
        b = copy.sample(64)
        assert all(torch.equal(x, y) for x, y in zip(a[:5], b[:5]))  # obs .. terminated


def test_resume_starts_fresh_games_and_no_stack_crosses_the_resume(tmp_path):
    """Pixel env state is not checkpointed: after a restore the next row is all episode starts."""
    cfg = frame_id_cfg(save_replay=True)
    with trainer_without_run(cfg, tmp_path / "a") as trainer:
        for _ in range(30):
            trainer.collector.collect()
        state = trainer.checkpoints.state_dict()
    with trainer_without_run(cfg, tmp_path / "b") as resumed:
        resumed.restore(state)
        assert len(resumed.replay) == len(trainer.replay) and resumed.counters.env_step == 30 * 3
        for _ in range(3):
            resumed.collector.collect()
        batch = resumed.replay.sample(512)
    episodes = torch.cat([batch.obs, batch.next_obs[:, -1:]], 1)[:, :, 0, 0]  # (B, 5) episode ids, 0 = padding
    for row in episodes.tolist():
        ids = [e for e in row if e]
        assert len(set(ids)) == 1 and row[-len(ids) :] == ids, f"stack mixes episodes or pads mid-stack: {row}"


def test_too_small_buffer_is_a_config_error():
    with pytest.raises(ConfigError, match="raise buffer_size to >= 24"):
        FrameReplay(16, 4, (84, 84), 4, torch.device("cpu"))


def test_capacity_that_does_not_fit_is_refused_with_numbers(monkeypatch):
    import fastdqn.memory as memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 2_000_000_000)
    nbytes = FrameReplay(1_000_000, 16, (84, 84), 4, torch.device("meta")).nbytes
    with pytest.raises(ConfigError) as err:
        check_replay_fits(nbytes, 1_000_000, torch.device("cpu"))
    message = str(err.value)
    assert "1,000,000 transitions needs 7.07 GB" in message and "only 2.00 GB is free" in message
    assert "at most 254,5" in message  # 0.9 * 2e9 / 7070 B
    monkeypatch.setattr(memory, "free_bytes", lambda device: 80_000_000_000)
    report = check_replay_fits(nbytes, 1_000_000, torch.device("cpu"))
    assert report == "replay: 1,000,000 transitions x 7,070 B = 7.07 GB on cpu (80.00 GB free)"


def test_cuda_graph_body_samples_frame_replay_like_the_eager_update(tmp_path):
    """GraphedUpdate's body (here uncaptured, on the CPU) draws FrameReplay samples from its device-side bounds:
    the same random draw gives exactly the eager update, and CUDA runs with compile may capture it."""
    from fastdqn.learner import DQNLearner
    from fastdqn.update_runner import GraphedUpdate, graph_wanted

    cfg = frame_id_cfg(batch_size=8)
    with trainer_without_run(cfg, tmp_path) as trainer:
        for _ in range(20):
            trainer.collector.collect()
        replay = trainer.replay
    learners = []
    for _ in range(2):
        torch.manual_seed(0)
        learners.append(DQNLearner(cfg, (4, 84, 84), 3, torch.device("cpu")))
    graphed = GraphedUpdate(learners[0], replay)
    for _ in range(2):
        torch.manual_seed(5)
        stats, td_errors = graphed.body()
        torch.manual_seed(5)
        eager_stats, eager_td = learners[1].step_on(replay.sample(cfg.batch_size))
        assert torch.equal(stats, eager_stats) and torch.equal(td_errors, eager_td)
    assert graph_wanted(cfg.updated(compile=True), torch.device("cuda"), replay)  # only inspected
