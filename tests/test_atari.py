"""Atari: both env backends, lives vs whole games, raw scores vs clipped training rewards, the Nature CNN, the
Atari preset and configs, and a short `fastdqn train --env ALE/Pong-v5 --envs 4` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from core_helpers import trainer_without_run
from fastdqn import cli
from fastdqn.atari import FireReset, GameTracker, make_pixel_env, rom_name
from fastdqn.config import Config
from fastdqn.envs import make_vector_env
from fastdqn.networks import NatureCNN, build_q_network

ROOT = Path(__file__).resolve().parents[1]


def pong(**kw) -> Config:
    return Config(**{"env_id": "ALE/Pong-v5", "device": "cpu", **kw})


@pytest.mark.parametrize("backend", ["ale_vector", "gymnasium"])
def test_backends_give_zero_padded_uint8_stacks_with_next_step_resets(backend):
    envs = make_vector_env(pong(atari_backend=backend, max_episode_steps=10), 2)
    try:
        assert envs.single_observation_space.shape == (4, 84, 84) and envs.single_observation_space.dtype == np.uint8
        obs, _ = envs.reset(seed=3)
        assert not obs[:, :3].any() and obs[:, 3].any(), "a reset stack is three zero frames and the first frame"
        for t in range(1, 12):
            previous = obs
            obs, rewards, terminated, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))
            if t <= 10:  # within the episode each stack shifts by one frame; step 10 hits the time limit
                assert (obs[:, :3] == previous[:, 1:]).all()
                assert truncated.all() == (t == 10) and not terminated.any()
            else:  # NEXT_STEP: the step after the end returns the reset stack and ends no transition
                assert not obs[:, :3].any() and not (truncated.any() or terminated.any())
    finally:
        envs.close()


def test_gymnasium_path_skips_frames_in_the_wrapper_and_keeps_sticky_actions():
    """AtariPreprocessing needs frameskip=1 below it (else each action lasts frame_skip squared frames); sticky
    actions are what the config says."""
    env = make_pixel_env(pong(frame_skip=3, repeat_action_probability=0.1, noop_max=7))
    try:
        assert env.unwrapped._frameskip == 1
        assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.1)
        wrappers = []
        while isinstance(env, gym.Wrapper):
            wrappers.append(env)
            env = env.env
        preprocessing = next(w for w in wrappers if isinstance(w, gym.wrappers.AtariPreprocessing))
        assert (preprocessing.frame_skip, preprocessing.noop_max) == (3, 7)
        assert any(isinstance(w, FireReset) for w in wrappers), "Pong's action 1 is FIRE"
    finally:
        env.close()
    no_fire = make_pixel_env(pong(fire_reset=False))
    assert not isinstance(no_fire.env, FireReset)
    no_fire.close()


def test_rom_names():
    assert rom_name("ALE/MsPacman-v5") == "ms_pacman" and rom_name("ALE/Pong-v5") == "pong"


def test_game_tracker_lives_and_whole_game_scores():
    tracker = GameTracker(2, episodic_life=True)
    tracker.reset({"lives": np.array([3, 3])})
    no = np.zeros(2, bool)
    term, starts, done = tracker.step(np.array([5.0, 1.0]), no, no, {"lives": np.array([2, 3])})
    assert term.tolist() == [True, False] and not starts.any() and done == {}  # a lost life: training end only
    term, starts, done = tracker.step(np.array([7.0, 0.0]), np.array([False, True]), no, {"lives": np.array([2, 3])})
    assert term.tolist() == [False, True] and done == {1: (1.0, 2)}  # env 1's game over, raw score
    term, starts, done = tracker.step(np.array([1.0, 0.0]), no, np.array([True, False]), {"lives": np.array([2, 5])})
    assert starts.tolist() == [False, True], "the step after a game over returns the reset observation"
    assert not term.any(), "new lives after a reset are not a loss; a truncation is not a termination"
    assert done == {0: (13.0, 3)}
    plain = GameTracker(1, episodic_life=False)
    plain.reset({"lives": np.array([3])})
    assert not plain.step(np.array([0.0]), no[:1], no[:1], {"lives": np.array([2])})[0].any()


def test_trainer_stores_clipped_rewards_reports_raw_scores_uint8_to_device(tmp_path):
    cfg = pong(
        num_envs=2, buffer_size=200, max_episode_steps=8, clip_rewards=True, learning_starts=10**9, overlap="never"
    )  # the envs step through envs.step, which the test wraps
    with trainer_without_run(cfg, tmp_path) as trainer:
        step = trainer.envs.step
        trainer.envs.step = lambda actions: (lambda o, r, te, tr, i: (o, r * 0 + 7.0, te, tr, i))(*step(actions))
        act = trainer.learner.act
        seen = []
        trainer.learner.act = lambda obs, eps, generator=None: (seen.append(obs.dtype), act(obs, eps))[1]
        for _ in range(20):
            trainer.collector.collect()
        assert set(seen) == {torch.uint8} and trainer.replay.frames.dtype == torch.uint8
        assert list(trainer.collector.recent_returns)[:2] == [56.0, 56.0], "whole-game raw score: 8 steps x 7"
        filled = trainer.replay.rewards[: len(trainer.replay)]
        assert set(filled[~trainer.replay.starts[: len(trainer.replay)]].tolist()) == {1.0}, "stored clipped"
        batch = trainer.replay.sample(16)
        assert batch.obs.dtype == torch.uint8 and batch.next_obs.dtype == torch.uint8


@pytest.mark.parametrize("dueling", [False, True])
def test_nature_cnn_shapes_dtypes_and_amp(dueling):
    net = build_q_network((4, 84, 84), 6, Config(dueling=dueling))
    assert isinstance(net, NatureCNN)
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    q = net(obs)
    assert q.shape == (5, 6) and q.dtype == torch.float32
    assert torch.allclose(q, net.head(net.torso(obs.float() / 255.0)), atol=1e-6), "scaling happens inside"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_amp = net(obs)
    assert q_amp.shape == (5, 6) and q_amp.dtype == torch.float32  # the head runs in float32 (test_amp.py)
    assert torch.allclose(q_amp, q, atol=0.05, rtol=0.05)
    net.channels_last = True  # what CUDA does; same numbers
    assert torch.allclose(net(obs), q, atol=1e-5)


def parse_train(*argv: str) -> Config:
    return cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_atari_preset_configs_and_user_overrides():
    cfg = parse_train("--env", "ALE/Breakout-v5", "--envs", "32")
    assert (cfg.buffer_size, cfg.learning_starts, cfg.target_update_interval, cfg.batch_size) == (
        1_000_000,
        80_000,
        1_000,
        32,
    )
    assert (cfg.learning_rate, cfg.train_every, cfg.epsilon_end, cfg.clip_rewards) == (1e-4, 4, 0.01, True)
    assert cfg.epsilon_decay_steps == cfg.total_steps // 10
    assert parse_train("--env", "ALE/Pong-v5", "--learning-rate", "3e-4").learning_rate == 3e-4
    assert parse_train("--env", "CartPole-v1").buffer_size == Config().buffer_size
    for name in ("pong", "breakout"):
        game = parse_train("--config", str(ROOT / "configs" / f"atari-{name}.yaml"), "--envs", "16")
        assert game.env_id.startswith("ALE/") and game.buffer_size == 1_000_000 and game.learning_rate == 1e-4
        assert game.epsilon_decay_steps == game.total_steps // 10 and game.num_envs == 16


def test_a_buffer_that_does_not_fit_is_refused_before_training(tmp_path, monkeypatch, capsys):
    import fastdqn.memory as memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 4_000_000_000)
    code = cli.main(["train", "--env", "ALE/Pong-v5", "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "replay buffer of 1,000,000 transitions needs 7.07 GB on cpu (7,070 B per transition)" in err
    assert "only 4.00 GB is free: lower buffer_size to at most 509,193" in err


@pytest.mark.slow
def test_cli_trains_pong_with_4_envs_and_records_a_video(tmp_path, capsys):
    run = tmp_path / "pong"
    code = cli.main(
        [
            "train",
            "--env",
            "ALE/Pong-v5",
            "--envs",
            "4",
            "--total-steps",
            "2000",
            "--buffer-size",
            "2000",
            "--learning-starts",
            "1000",
            "--train-every",
            "16",
            "--target-update-interval",
            "500",
            "--max-episode-steps",
            "100",
            "--eval-episodes",
            "1",
            "--device",
            "cpu",
            "--torch-threads",
            "1",
            "--run-dir",
            str(run),
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "replay: 2,000 transitions x 7,074 B = 14.15 MB on cpu" in err  # 7070 B + the spare zero frame
    result = json.loads(out.strip().splitlines()[-1])
    assert result["env_steps"] == 2000 and np.isfinite(result["final_eval_mean"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("loss") is not None and np.isfinite(r["loss"]) for r in records)
    code = cli.main(["eval", str(run), "--episodes", "1", "--video"])
    assert code == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["video"].endswith((".mp4", ".gif")) and (run / saved["video"].rsplit("/", 1)[-1]).stat().st_size > 0


@pytest.mark.slow
def test_atari_benchmark_script_runs(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_atari_envs.py stays runnable (tiny sizes; no timing is asserted)."""
    import runpy

    out = tmp_path / "bench.json"
    monkeypatch.setattr(
        "sys.argv",
        [
            "bench_atari_envs.py",
            "--envs",
            "2",
            "--steps",
            "20",
            "--rounds",
            "1",
            "--capacity",
            "200",
            "--replay-envs",
            "2",
            "--replay-iters",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    runpy.run_path(str(ROOT / "benchmarks" / "bench_atari_envs.py"), run_name="__main__")
    results = json.loads(out.read_text())
    assert set(results["env_sps"]["2"]) == {"ale_vector", "gymnasium"}
    assert {"FrameReplay add (2 envs)", "FrameReplay sample (32)"} <= set(results["replay_us"])
    assert "ratio" in capsys.readouterr().out


def test_video_of_an_env_that_cannot_render_is_a_one_line_error(monkeypatch):
    import fastdqn.video as video
    from fastdqn.errors import EnvError

    class NoRender(gym.Wrapper):
        def render(self):
            raise gym.error.DependencyNotInstalled("pygame is not installed")

    monkeypatch.setattr(video, "make_render_env", lambda cfg: NoRender(gym.make("CartPole-v1")))
    with pytest.raises(EnvError, match="--video cannot render 'CartPole-v1' .pygame is not installed"):
        video.record_episode(lambda o: torch.zeros(1, dtype=torch.int64), Config(), 0, torch.device("cpu"))
