"""MinAtar and other grid observations: fastdqn registers MinAtar's ids itself, every id trains, (H, W, C) grids go
to the MinAtar CNN and sit in the replay at one byte a cell, and an observation space no network takes is refused
with the list of those it takes."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import tomllib
import torch

from fastdqn.api import evaluate
from fastdqn.atari import is_image_space
from fastdqn.config import Config, from_dict, load_yaml
from fastdqn.envs import check_env_id, check_spaces, make_vector_env
from fastdqn.errors import EnvError
from fastdqn.networks import MinAtarCNN, NatureCNN, build_q_network
from fastdqn.presets import MINATAR

ROOT = Path(__file__).resolve().parents[1]
GAMES = {"Asterix": (4, 5), "Breakout": (4, 3), "Freeway": (7, 3), "Seaquest": (10, 6), "SpaceInvaders": (6, 4)}
# each game's grid channels and the size of its own (v1) action set
IDS = [f"MinAtar/{game}-{version}" for game in GAMES for version in ("v0", "v1")]
SHORT = dict(
    device="cpu",
    num_envs=2,
    total_steps=400,
    learning_starts=100,
    buffer_size=1_000,
    batch_size=16,
    train_every=4,
    gradient_steps=1,
    eval_every=0,
    eval_episodes=1,
    log_every=200,
    checkpoint_every=0,
)
# A few thousand env steps per id, with updates sparse enough that all ten ids stay a few seconds each.
THOUSANDS = {**SHORT, "total_steps": 2_000, "learning_starts": 400, "train_every": 16, "log_every": 1_000}


@pytest.fixture
def without_minatar(monkeypatch):
    """A process where minatar is not installed and its ids are not registered."""
    for env_id in [k for k in gym.registry if k.startswith("MinAtar/")]:
        monkeypatch.delitem(gym.registry, env_id)
    monkeypatch.setitem(sys.modules, "minatar.gym", None)  # `import` of it raises ImportError


@pytest.mark.parametrize("env_id", IDS)
def test_every_minatar_id_trains_a_few_thousand_steps(env_id, tmp_path):
    """All five games in both versions (v0: six actions, v1: the game's own) through the whole loop for 2,000 env
    steps: collection, updates on the MinAtar CNN (dueling on v1) that change its weights, the final greedy
    evaluation and checkpoint."""
    from fastdqn.trainer import Trainer

    game, version = env_id.split("/")[1].split("-")
    envs = make_vector_env(Config(env_id=env_id), 2)
    space, actions = envs.single_observation_space, envs.single_action_space.n
    envs.close()
    channels, own_actions = GAMES[game]
    assert space.shape == (10, 10, channels) and space.dtype == np.bool_
    assert actions == (6 if version == "v0" else own_actions)
    trainer = Trainer(
        Config(env_id=env_id, dueling=version == "v1", **THOUSANDS), tmp_path / "run", show_progress=False
    )
    assert isinstance(trainer.learner.q, MinAtarCNN)
    start = [p.detach().clone() for p in trainer.learner.q.parameters()]
    result = trainer.run()
    assert result.env_steps == 2_000 and result.updates == 1_600 // 16
    assert all(not torch.equal(a, p) for a, p in zip(start, trainer.learner.q.parameters()))
    assert np.isfinite(result.final_eval_mean)


@pytest.mark.slow
def test_breakout_trains_thousands_of_steps_storing_one_byte_per_cell(tmp_path):
    from fastdqn.trainer import Trainer

    cfg = Config(
        env_id="MinAtar/Breakout-v1",
        device="cpu",
        total_steps=3_000,
        learning_starts=500,
        buffer_size=3_000,
        eval_every=1_500,
        eval_episodes=3,
        checkpoint_every=0,
        log_every=500,
    )
    trainer = Trainer(cfg, tmp_path / "run", show_progress=False)
    assert isinstance(trainer.learner.q, MinAtarCNN)
    replay = trainer.replay
    assert replay.obs.dtype == replay.next_obs.dtype == torch.uint8
    cells = 10 * 10 * 4
    assert replay.obs.element_size() * replay.obs[0].numel() == cells  # one byte a cell, for obs and next obs
    assert "x 820 B" in trainer.replay_report  # 2 x 400 cells, then action, reward, terminated, truncated
    start = [p.detach().clone() for p in trainer.learner.q.parameters()]
    result = trainer.run()
    assert result.env_steps == 3_000 and result.updates == 2_500 and len(result.evals) == 2
    assert all(not torch.equal(a, p) for a, p in zip(start, trainer.learner.q.parameters()))
    stored = replay.obs[: len(replay)]
    assert set(stored.unique().tolist()) == {0, 1} and replay.next_obs[: len(replay)].sum() > 0
    assert evaluate(tmp_path / "run", episodes=2).episodes == 2  # the saved policy loads and plays


def test_a_resumed_minatar_run_starts_fresh_games_instead_of_a_saved_observation_of_a_lost_one(tmp_path):
    """MinAtar's game state lives in objects the checkpoint's env snapshot does not walk: a resumed run resets its
    envs, so no stored transition pairs the saved observation with a game that was reset underneath it."""
    from fastdqn.checkpoint import checkpoint_path
    from fastdqn.checkpointer import load_run_checkpoint
    from fastdqn.trainer import Trainer

    cfg = Config(env_id="MinAtar/Breakout-v1", **{**SHORT, "checkpoint_every": 200, "keep_checkpoints": 3})
    whole = Trainer(cfg, tmp_path / "whole", show_progress=False)
    whole.run()
    saved = load_run_checkpoint(checkpoint_path(tmp_path / "whole", 200), torch.device("cpu"))
    resumed = Trainer(cfg, tmp_path / "resumed", show_progress=False)
    fresh = resumed.collector.obs.copy()
    resumed.restore(saved)
    assert not np.array_equal(saved["obs"].numpy(), fresh)  # mid-game at step 200
    assert np.array_equal(resumed.collector.obs, fresh)
    result = resumed.run()
    assert result.env_steps == 400 and resumed.counters.updates == whole.counters.updates


def test_minatar_ids_take_the_papers_settings_and_the_yaml_spells_them_out():
    cfg = Config(env_id="MinAtar/Seaquest-v1")
    assert all(getattr(cfg, key) == value for key, value in MINATAR.items())
    assert Config(env_id="MinAtar/Seaquest-v1", batch_size=64).batch_size == 64  # given keys win
    shipped = from_dict(load_yaml(ROOT / "configs" / "minatar.yaml"))
    assert all(getattr(shipped, key) == value for key, value in MINATAR.items())


def test_minatar_ids_are_registered_by_fastdqn(monkeypatch):
    for env_id in [k for k in gym.registry if k.startswith("MinAtar/")]:
        monkeypatch.delitem(gym.registry, env_id)
    check_env_id("MinAtar/Freeway-v1")
    assert set(IDS) <= set(gym.registry)
    with pytest.raises(EnvError, match="'MinAtar/Breakot-v1': did you mean 'MinAtar/Breakout-v1'"):
        check_env_id("MinAtar/Breakot-v1")


def test_a_minatar_id_without_minatar_names_the_extra_that_installs_it(without_minatar):
    with pytest.raises(EnvError, match=r"needs minatar: pip install 'fastdqn\[minatar\]'"):
        make_vector_env(Config(env_id="MinAtar/Breakout-v1"), 1)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("minatar") for req in extras["minatar"])


def test_the_network_is_chosen_by_the_observation_shape():
    cfg = Config(device="cpu")
    assert type(build_q_network((4,), 2, cfg)).__name__ == "MLPQNetwork"
    assert isinstance(build_q_network((4, 84, 84), 6, cfg), NatureCNN)
    grid = build_q_network((10, 10, 7), 6, cfg)
    assert isinstance(grid, MinAtarCNN) and grid.torso[0].in_channels == 7
    assert grid(torch.zeros(2, 10, 10, 7, dtype=torch.bool)).shape == (2, 6)
    assert build_q_network((8, 6, 3), 4, cfg)(torch.zeros(1, 8, 6, 3, dtype=torch.uint8)).shape == (1, 4)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        build_q_network((2, 3), 2, cfg)


def test_small_uint8_grids_are_not_screens_and_large_ones_are():
    """A uint8 (H, W, C) up to 32x32 is a grid (MiniGrid's 7x7x3) and goes to the network as it is; larger ones are
    screens, turned into 84x84 grayscale frame stacks for the Nature CNN."""
    assert not is_image_space(gym.spaces.Box(0, 255, (7, 7, 3), np.uint8))
    assert not is_image_space(gym.spaces.Box(0, 1, (10, 10, 4), bool))
    assert is_image_space(gym.spaces.Box(0, 255, (64, 64, 3), np.uint8))
    assert is_image_space(gym.spaces.Box(0, 255, (210, 160), np.uint8))
    check_spaces("grid", gym.spaces.Box(0, 255, (7, 7, 3), np.uint8), gym.spaces.Discrete(3))  # taken


class ObjectGrid(gym.Env):
    """A 7x7 grid of uint8 object codes (0-10) in 3 channels, like MiniGrid's image observation; episodes of 5 steps."""

    observation_space = gym.spaces.Box(0, 255, (7, 7, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.integers(0, 11, (7, 7, 3), dtype=np.uint8), {}

    def step(self, action):
        self.t += 1
        obs = self.np_random.integers(0, 11, (7, 7, 3), dtype=np.uint8)
        return obs, float(action == 1), self.t >= 5, False, {}


def test_a_uint8_grid_env_trains_on_the_minatar_cnn_without_screen_preprocessing(tmp_path):
    from fastdqn.trainer import Trainer

    gym.register("fastdqn_test/ObjectGrid-v0", entry_point=ObjectGrid)
    cfg = Config(**{**SHORT, "env_id": "fastdqn_test/ObjectGrid-v0"})
    trainer = Trainer(cfg, tmp_path / "run", show_progress=False)
    assert trainer.envs.single_observation_space.shape == (7, 7, 3)  # not resized, grayed or stacked
    assert isinstance(trainer.learner.q, MinAtarCNN) and trainer.replay.obs.dtype == torch.uint8
    result = trainer.run()
    assert result.env_steps == 400 and result.episodes == 80
    assert trainer.replay.obs[: len(trainer.replay)].max() == 10  # the codes as they are


@pytest.mark.parametrize(
    "space",
    [
        gym.spaces.Box(0, 1, (2, 3), np.float32),
        gym.spaces.Box(0, 1, (2, 2, 3), np.float32),
        gym.spaces.Box(0, 255, (64, 64, 3), np.uint8),  # a screen: make_vector_env makes frame stacks of it first
        gym.spaces.Dict({"grid": gym.spaces.Box(0, 1, (10, 10, 4), bool)}),
        gym.spaces.Discrete(16),
    ],
    ids=["2d-float", "grid-under-3x3", "raw-screen", "dict", "discrete"],
)
def test_an_observation_space_no_network_takes_is_refused_with_those_it_takes(space):
    with pytest.raises(EnvError) as refused:
        check_spaces("odd", space, gym.spaces.Discrete(3))
    message = str(refused.value)
    assert "\n" not in message and f"has observation space {space}" in message
    for taken in ("flat Box", "(H, W, C) Box grid", "uint8 screen", "FlattenObservation"):
        assert taken in message
