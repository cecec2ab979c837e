"""Collection: one vector step of every env, acted on the device and stored in the replay.

Every kind of env shares the step: stage the observations to the device, act epsilon-greedily there, copy the
actions back (the loop's one device->host copy), step the envs, clip the rewards that are stored, and count env
steps and finished episodes. What is stored follows the envs' autoreset convention:

- `TransitionWriter`, SAME_STEP vector envs: the step that ends an episode returns the reset observation and the
  true final one in `info["final_obs"]`, which is put back, so each env stores one whole transition per step.
- `FrameWriter`, NEXT_STEP pixel envs: each env's newest frame is stored once (`FrameReplay`); the step after an
  episode end returns the reset observation, stored as an episode start, not a transition. Lives and whole-game
  scores come from `GameTracker`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from fastdqn.atari import GameTracker
from fastdqn.config import Config
from fastdqn.counters import Counters
from fastdqn.envs import finished_episodes, get_env_state, resolve_vector_mode, set_env_state, true_next_obs
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner
from fastdqn.networks import is_pixel_shape
from fastdqn.replay import Replay
from fastdqn.schedules import epsilon_at
from fastdqn.staging import Staging

Stepped = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]  # what `envs.step` returns
RECENT_EPISODES = 20  # finished episodes averaged into the logged recent return


class TransitionWriter:
    """Stores a SAME_STEP vector step as one whole transition per env, with the true next observation."""

    def __init__(self, replay: Replay, staging: Staging):
        self.replay, self.staging = replay, staging

    def write(self, obs_t: torch.Tensor, actions_t: torch.Tensor, rewards_t: torch.Tensor,
              stepped: Stepped) -> list[tuple[float, int]]:
        """Store the vector step; returns (raw return, length) of each episode that ended in it."""
        next_obs, _, terminated, truncated, infos = stepped
        stage = self.staging
        self.replay.add(obs_t, actions_t, rewards_t, stage.to_device("next_obs", true_next_obs(next_obs, infos)),
                        stage.to_device("terminated", terminated, torch.float32),
                        stage.to_device("truncated", truncated, torch.float32))
        return finished_episodes(infos)


class FrameWriter:
    """Stores a NEXT_STEP pixel vector step as each env's newest frame, marking reset observations as starts."""

    def __init__(self, replay: FrameReplay, staging: Staging, cfg: Config, reset_infos: dict[str, Any]):
        self.replay, self.staging = replay, staging
        self.games = GameTracker(cfg.num_envs, cfg.episodic_life)
        self.games.reset(reset_infos)
        self.reset_frames_pending = True  # the first write stores the reset frames first, as episode starts

    def write(self, obs_t: torch.Tensor, actions_t: torch.Tensor, rewards_t: torch.Tensor,
              stepped: Stepped) -> list[tuple[float, int]]:
        """Store the vector step; returns (raw whole-game score, length) of each game that ended in it."""
        next_obs, rewards, terminated, truncated, infos = stepped
        stage = self.staging
        if self.reset_frames_pending:
            self.replay.add_resets(obs_t[:, -1])
            self.reset_frames_pending = False
        train_terminated, starts, finished = self.games.step(rewards, terminated, truncated, infos)
        self.replay.add(stage.to_device("frames", next_obs[:, -1]), actions_t, rewards_t,
                        stage.to_device("terminated", train_terminated, torch.uint8), stage.to_device("starts", starts))
        return list(finished.values())


class Collector:
    """Steps `envs` with `learner`'s epsilon-greedy actions and stores every vector step in `replay`.

    Holds what the next step needs (the envs' last observations) and the episode bookkeeping: env steps and
    episodes in `counters`, the recent raw returns. It logs nothing: `collect` returns the episodes that ended.
    """

    def __init__(self, cfg: Config, envs: gym.vector.VectorEnv, replay: Replay, learner: DQNLearner,
                 counters: Counters, device: torch.device):
        self.cfg, self.envs, self.replay, self.learner, self.counters = cfg, envs, replay, learner, counters
        self.staging = Staging(device)
        self.obs, reset_infos = envs.reset(seed=cfg.seed)
        pixels = is_pixel_shape(tuple(envs.single_observation_space.shape))
        self.writer = FrameWriter(replay, self.staging, cfg, reset_infos) if pixels \
            else TransitionWriter(replay, self.staging)
        # Exact env state goes into checkpoints where it is plain Python data: not for envs in subprocesses
        # (async) or in C++ (pixel envs), whose resumed runs start fresh episodes.
        self.snapshot_envs = not pixels and resolve_vector_mode(cfg) != "async"
        self.recent_returns: deque[float] = deque(maxlen=RECENT_EPISODES)

    def collect(self) -> list[tuple[float, int]]:
        """Act in all envs once and store the vector step; returns (raw return, length) of the episodes that ended
        (whole games for Atari), already counted."""
        cfg, stage, counters = self.cfg, self.staging, self.counters
        obs_t = stage.to_device("obs", self.obs)
        actions_t = self.learner.act(obs_t, epsilon_at(cfg, counters.env_step))
        actions = stage.to_host("actions", actions_t)  # the one device->host copy of a vector step
        stepped = self.envs.step(actions)
        rewards = np.clip(stepped[1], -1.0, 1.0) if cfg.clip_rewards else stepped[1]
        finished = self.writer.write(obs_t, actions_t, stage.to_device("rewards", rewards, torch.float32), stepped)
        self.learner.observe(obs_t)
        self.obs = stepped[0]
        counters.env_step += cfg.num_envs
        counters.episodes += len(finished)
        self.recent_returns.extend(ret for ret, _ in finished)
        return finished

    def recent_return(self) -> float | None:
        """Mean raw return of the last RECENT_EPISODES finished episodes, None before the first."""
        return float(np.mean(self.recent_returns)) if self.recent_returns else None

    def state_dict(self) -> dict[str, Any]:
        """The envs' last observations, their exact state where it can be read, and the recent returns."""
        return {"obs": torch.from_numpy(np.array(self.obs, copy=True)),
                "env_state": get_env_state(self.envs) if self.snapshot_envs else {},
                "recent_returns": list(self.recent_returns)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`; envs without a saved state keep their fresh reset."""
        if state["env_state"]:
            set_env_state(self.envs, state["env_state"])
            self.obs = state["obs"].numpy().copy()
        self.recent_returns.extend(state["recent_returns"])
