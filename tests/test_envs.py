"""Vector envs: SAME_STEP autoreset handled so no stored transition crosses an episode boundary
(with SAME_STEP, the observation returned at an episode's last step is already the next episode's first)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from core_helpers import COUNTER_ENV, REWARD, TIME_LIMIT, classic, drive, trainer_without_run
from fastdqn.config import Config
from fastdqn.envs import (
    check_env_id,
    check_spaces,
    finished_episodes,
    make_vector_env,
    step_together,
    true_next_obs,
)
from fastdqn.errors import EnvError


def step_counter_envs(num_envs: int, vector_steps: int, seed: int = 0):
    """Yield (obs, real_next_obs, terminated, truncated, infos) of random steps of counter envs."""
    envs = make_vector_env(Config(env_id=COUNTER_ENV), num_envs)
    rng = np.random.default_rng(seed)
    try:
        obs, _ = envs.reset(seed=seed)
        for _ in range(vector_steps):
            next_obs, _, terminated, truncated, infos = envs.step(rng.integers(0, 2, num_envs))
            yield obs, true_next_obs(next_obs, infos), terminated, truncated, infos
            obs = next_obs
    finally:
        envs.close()


def test_vector_env_uses_same_step_autoreset():
    envs = make_vector_env(Config(env_id=COUNTER_ENV), 2)
    try:
        assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        assert isinstance(envs, gym.vector.SyncVectorEnv)
    finally:
        envs.close()


def test_no_transition_pairs_a_final_observation_with_a_reset_one():
    """Two counter envs out of phase, 4-step limit: every (obs, real next obs) pair is one step of one episode."""
    ended_alone = saw_terminated = saw_truncated = 0
    for obs, real_next, terminated, truncated, infos in step_counter_envs(2, 200):
        assert np.array_equal(real_next[:, 0], obs[:, 0] + 1), (obs, real_next)
        assert np.array_equal(real_next[:, 1], obs[:, 1])
        done = terminated | truncated
        ended_alone += int(done.sum() == 1)
        saw_terminated += int(terminated.sum())
        saw_truncated += int((truncated & ~terminated).sum())
        # the next obs the agent acts on is the reset one (t = 0) exactly where an episode ended
        assert np.array_equal(infos.get("_final_obs", np.zeros(2, bool)), done)
    assert ended_alone > 10  # the two envs really were out of phase
    assert saw_terminated > 10 and saw_truncated > 10


def test_truncated_final_obs_is_stored_as_next_obs(tmp_path, tiny_cfg):
    cfg = classic(tiny_cfg, env_id=COUNTER_ENV, num_envs=2, buffer_size=400, learning_starts=10_000)
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 400)
        buf = trainer.replay
        assert len(buf) == 400
        t, next_t = buf.obs[:, 0], buf.next_obs[:, 0]
        assert torch.equal(next_t, t + 1) and torch.equal(buf.next_obs[:, 1], buf.obs[:, 1])
        # the time limit's final observation (t = 4) is stored, never the reset one (t = 0)
        truncated = (next_t == TIME_LIMIT) & (buf.terminated == 0)
        assert truncated.sum() > 10
        assert (next_t > 0).all()
        # a stored terminal flag only where the env really terminated (terminate_at is in 2..6)
        assert set(next_t[buf.terminated == 1].tolist()) <= {2.0, 3.0, 4.0}
        assert torch.equal(buf.rewards, torch.full_like(buf.rewards, REWARD))


def test_finished_episodes_reports_raw_return_and_length():
    found = []
    for *_, infos in step_counter_envs(3, 60):
        found += finished_episodes(infos)
    assert len(found) > 20
    for ret, length in found:
        assert 2 <= length <= TIME_LIMIT
        assert ret == pytest.approx(REWARD * length)


def test_true_next_obs_leaves_running_envs_alone():
    next_obs = np.array([[0.0, 7.0], [3.0, 9.0]], dtype=np.float32)
    infos = {"final_obs": np.array([np.array([4.0, 5.0]), None], dtype=object), "_final_obs": np.array([True, False])}
    real = true_next_obs(next_obs, infos)
    assert real.tolist() == [[4.0, 5.0], [3.0, 9.0]]
    assert next_obs.tolist() == [[0.0, 7.0], [3.0, 9.0]]  # the obs the agent acts on next is not changed
    assert true_next_obs(next_obs, {}) is next_obs


def per_env_true_next_obs(next_obs: np.ndarray, infos: dict) -> np.ndarray:
    """The obvious reference: a loop over the envs that puts each ended env's final observation back."""
    real = next_obs.copy()
    for i in range(len(next_obs)):
        if infos.get("_final_obs", np.zeros(len(next_obs), bool))[i]:
            real[i] = infos["final_obs"][i]
    return real


@pytest.mark.parametrize(
    "env_id,vector_mode", [(COUNTER_ENV, "sync"), ("CartPole-v1", "native"), (COUNTER_ENV, "async")]
)
def test_batched_true_next_obs_equals_the_per_env_loop(env_id, vector_mode):
    """Per-env final observations (sync, async: objects or stacked arrays) and one array (native CartPole)."""
    envs = make_vector_env(Config(env_id=env_id, vector_mode=vector_mode, max_episode_steps=6), 5)
    rng, ends = np.random.default_rng(1), 0
    try:
        envs.reset(seed=1)
        out = np.full((5, *envs.single_observation_space.shape), np.nan, np.float32)
        for _ in range(40):
            next_obs, _, terminated, truncated, infos = envs.step(rng.integers(0, 2, 5))
            expected = per_env_true_next_obs(next_obs, infos)
            assert np.array_equal(true_next_obs(next_obs, infos), expected)
            assert np.array_equal(true_next_obs(next_obs, infos, out=out), expected) and out.dtype == np.float32
            ends += int((terminated | truncated).sum())
    finally:
        envs.close()
    assert ends >= 10


def test_unknown_env_id_suggests_close_matches():
    with pytest.raises(EnvError, match="unknown env id 'CartPol-v1': did you mean 'CartPole-v1'"):
        check_env_id("CartPol-v1")
    with pytest.raises(EnvError, match="unknown env id 'Acrobot-v9'.*'Acrobot-v1'"):
        make_vector_env(Config(env_id="Acrobot-v9"), 1)
    with pytest.raises(EnvError, match="unknown env id 'zzzqqq'"):
        check_env_id("zzzqqq")


def test_continuous_action_space_names_the_space():
    with pytest.raises(EnvError, match=r"Pendulum-v1' has action space Box\(.*Discrete action space"):
        make_vector_env(Config(env_id="Pendulum-v1"), 1)


def test_discrete_actions_that_do_not_start_at_zero_are_rejected():
    """The Q-network picks actions 0..n-1: an env expecting 1..3 would get wrong or invalid actions silently."""
    with pytest.raises(EnvError, match="start at 1: fastdqn's actions are 0..n-1"):
        check_spaces("shifted", gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(3, start=1))


def test_image_observation_space_is_rejected_with_the_fix():
    with pytest.raises(EnvError, match="flat Box"):
        check_spaces("img", gym.spaces.Box(0, 255, (84, 84, 3), np.uint8), gym.spaces.Discrete(3))
    check_spaces("ok", gym.spaces.Box(-1, 1, (4,), np.float32), gym.spaces.Discrete(2))  # no error


def test_max_episode_steps_overrides_the_time_limit():
    envs = make_vector_env(Config(env_id="CartPole-v1", max_episode_steps=5), 1)
    try:
        envs.reset(seed=0)
        for i in range(5):
            _, _, terminated, truncated, infos = envs.step(np.array([i % 2]))  # alternate: CartPole stays up
        assert truncated[0] and not terminated[0]
        assert [length for _, length in finished_episodes(infos)] == [5]
    finally:
        envs.close()


def test_async_vector_env_collects_the_same_transitions_as_sync(tmp_path, tiny_cfg):
    """`vector_mode: async` (one process per env) is a speed choice only: same seed, same stored transitions."""
    stored = {}
    for mode in ("sync", "async"):
        cfg = classic(tiny_cfg, num_envs=2, vector_mode=mode, learning_starts=100, buffer_size=300, batch_size=16)
        with trainer_without_run(cfg, tmp_path / mode) as trainer:
            assert isinstance(trainer.envs, gym.vector.AsyncVectorEnv) == (mode == "async")
            drive(trainer, 300)
            replay = trainer.replay
            stored[mode] = [
                replay.obs.clone(),
                replay.actions.clone(),
                replay.next_obs.clone(),
                replay.terminated.clone(),
            ]
            assert trainer.counters.episodes > 5  # episode ends (final_obs from the worker processes) included
    for sync_part, async_part in zip(stored["sync"], stored["async"]):
        assert torch.equal(sync_part, async_part)


# --- vector_mode native: gymnasium's numpy CartPole with SAME_STEP autoreset ----------------------------------
def test_native_cartpole_steps_like_gymnasiums_single_env_and_resets_in_the_same_step():
    """Every env of SameStepCartPole follows CartPoleEnv's physics, reward and time limit (40 here); a finished
    env returns its reset observation in the same step, with the final one in final_obs and its statistics."""
    num_envs, limit = 6, 40
    envs = make_vector_env(Config(env_id="CartPole-v1", vector_mode="native", max_episode_steps=limit), num_envs)
    singles = [gym.make("CartPole-v1").unwrapped for _ in range(num_envs)]
    rng = np.random.default_rng(0)
    obs, _ = envs.reset(seed=3)
    for env, o in zip(singles, obs):
        env.reset(seed=0)
        env.state = o.astype(np.float64)
    lengths, returns, ended = np.zeros(num_envs, dtype=int), np.zeros(num_envs), {"terminated": 0, "truncated": 0}
    for _ in range(300):
        # some balancing actions (so episodes also reach the time limit), the rest random
        actions = np.where(
            rng.random(num_envs) < 0.3, (obs[:, 2] + 0.3 * obs[:, 3] > 0).astype(int), rng.integers(0, 2, num_envs)
        )
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        real_next = true_next_obs(obs, infos)
        lengths += 1
        for i, env in enumerate(singles):
            expected, reward, term, _, _ = env.step(int(actions[i]))
            returns[i] += reward
            np.testing.assert_allclose(real_next[i], expected, rtol=0, atol=1e-6)
            assert (rewards[i], terminated[i], truncated[i]) == (reward, term, lengths[i] >= limit)  # as TimeLimit
        done = terminated | truncated
        assert np.array_equal(infos.get("_final_obs", np.zeros(num_envs, bool)), done)
        finished = finished_episodes(infos)
        assert finished == [(returns[i], lengths[i]) for i in np.flatnonzero(done)]
        for i in np.flatnonzero(done):
            assert np.all(np.abs(obs[i]) <= 0.05)  # a fresh episode's start state, in the same step
            singles[i].reset()
            singles[i].state = obs[i].astype(np.float64)
            lengths[i], returns[i] = 0, 0.0
        ended["terminated"] += int(terminated.sum())
        ended["truncated"] += int((truncated & ~terminated).sum())
    assert ended["terminated"] > 10 and ended["truncated"] > 5


def test_cartpoles_stepped_together_step_as_each_alone():
    """`step_together` (a population's agents' envs in one numpy step) gives what each env's own step gives, resets
    from each env's own generator included, and leaves each env in the state its own steps leave it."""
    cfg = Config(env_id="CartPole-v1", vector_mode="native", max_episode_steps=30)
    alone = [make_vector_env(cfg, n) for n in (4, 3, 5)]
    together = [make_vector_env(cfg, n) for n in (4, 3, 5)]
    for k, (a, b) in enumerate(zip(alone, together)):
        a.reset(seed=10 + k)
        b.reset(seed=10 + k)
    engine = together[0].with_envs(12)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(200):
        actions = [rng.integers(0, 2, env.num_envs) for env in alone]
        for a, b, act in zip(alone, step_together(together, actions, engine), actions):
            expected = a.step(act)
            for got, want in zip(b[:4], expected[:4]):
                assert np.array_equal(got, want)
            assert b[4].keys() == expected[4].keys()
            if expected[4]:
                assert np.array_equal(b[4]["final_obs"], expected[4]["final_obs"])
                assert np.array_equal(b[4]["_final_obs"], expected[4]["_final_obs"])
                episode, want_episode = b[4]["final_info"]["episode"], expected[4]["final_info"]["episode"]
                assert all(np.array_equal(episode[key], want_episode[key]) for key in ("r", "l"))
                ended += int(expected[4]["_final_obs"].sum())
    assert ended > 50  # terminations and 30-step time limits, each reset drawn from its env's generator
    for a, b in zip(alone, together):
        assert np.array_equal(a.state, b.state) and np.array_equal(a.steps, b.steps)
        assert a.np_random.bit_generator.state == b.np_random.bit_generator.state


def test_vector_mode_auto_is_native_for_cartpole_only_and_native_elsewhere_names_the_fix():
    native = make_vector_env(Config(env_id="CartPole-v1", vector_mode="auto"), 2)
    sync = make_vector_env(Config(env_id="Acrobot-v1", vector_mode="auto"), 2)
    try:
        assert type(native).__name__ == "SameStepCartPole"
        assert native.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        assert isinstance(sync, gym.vector.SyncVectorEnv)
    finally:
        native.close()
        sync.close()
    with pytest.raises(EnvError, match="no native vectorized implementation.*vector_mode auto or sync"):
        make_vector_env(Config(env_id="Acrobot-v1", vector_mode="native"), 2)


def test_native_env_with_env_restarts_warns_that_it_is_not_guarded(capsys):
    """env_restarts can change on resume, so it must not switch an auto run's envs: native stays, with a warning."""
    envs = make_vector_env(Config(env_id="CartPole-v1", env_restarts=2), 2)
    envs.close()
    assert type(envs).__name__ == "SameStepCartPole"
    assert "not guarded (use vector_mode sync" in capsys.readouterr().err
