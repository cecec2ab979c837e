"""Collection: one vector step of every env, acted on the device and stored in the replay.

Every kind of env shares the step, in two halves so that the updates can run between them (see stepping.py):
`start` acts epsilon-greedily on the device, copies the actions back (the loop's one device->host copy) and starts
the envs' step; `finish` collects it, writes everything it produced into one staging buffer (staging.py), copies
that to the device in one copy, stores the transition and counts env steps and finished episodes. The
observations reach the device once: the next observations of step t are what step t+1 acts on and stores. What
is stored follows the envs' autoreset convention:

- `TransitionWriter`, SAME_STEP vector envs: the step that ends an episode returns the reset observation and the
  true final one in `info["final_obs"]`, which is put back, so each env stores one whole transition per step.
- `FrameWriter`, NEXT_STEP pixel envs: each env's newest frame is stored once (`FrameReplay`): the last frame of
  the next observations it acts on; the step after an episode end returns the reset observation, stored as an
  episode start, not a transition. Lives and whole-game scores come from `GameTracker`.
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
from fastdqn.envs import finished_episodes, get_env_state, obs_dtype, resolve_vector_mode, set_env_state, true_next_obs
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner
from fastdqn.networks import is_pixel_shape
from fastdqn.presets import is_minatar_id
from fastdqn.replay import Replay
from fastdqn.schedules import epsilon_at
from fastdqn.spaces import obs_shape
from fastdqn.staging import Fields, Staging
from fastdqn.stepping import Stepped, make_stepper

RECENT_EPISODES = 20  # finished episodes averaged into the logged recent return


def rewards_into(out: np.ndarray, rewards: np.ndarray, clip: bool) -> None:
    """The rewards to store, clipped to [-1, 1] when `clip` (returns are reported raw)."""
    if clip:
        np.clip(rewards, -1.0, 1.0, out=out, casting="unsafe")
    else:
        out[...] = rewards


class TransitionWriter:
    """Stores a SAME_STEP vector step as one whole transition per env, with the true next observation."""

    def __init__(self, replay: Replay, cfg: Config):
        self.replay, self.clip = replay, cfg.clip_rewards

    @staticmethod
    def fields(n: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype) -> Fields:
        """What a vector step stages: the observations acted on next, the true next ones, rewards and flags."""
        return {
            "obs": ((n, *obs_shape), obs_dtype),
            "next_obs": ((n, *obs_shape), obs_dtype),
            "rewards": ((n,), torch.float32),
            "terminated": ((n,), torch.float32),
            "truncated": ((n,), torch.float32),
        }

    def fill(self, host: dict[str, np.ndarray], stepped: Stepped) -> list[tuple[float, int]]:
        """Write the vector step into the staging buffer; returns (raw return, length) of each episode that ended."""
        next_obs, rewards, terminated, truncated, infos = stepped
        host["obs"][...] = next_obs
        true_next_obs(next_obs, infos, out=host["next_obs"])
        rewards_into(host["rewards"], rewards, self.clip)
        host["terminated"][...] = terminated
        host["truncated"][...] = truncated
        return finished_episodes(infos)

    def store(self, obs_t: torch.Tensor, actions_t: torch.Tensor, dev: dict[str, torch.Tensor]) -> None:
        self.replay.add(obs_t, actions_t, dev["rewards"], dev["next_obs"], dev["terminated"], dev["truncated"])


class FrameWriter:
    """Stores a NEXT_STEP pixel vector step as each env's newest frame, marking reset observations as starts."""

    def __init__(self, replay: FrameReplay, cfg: Config, reset_infos: dict[str, Any]):
        self.replay, self.clip = replay, cfg.clip_rewards
        self.games = GameTracker(cfg.num_envs, cfg.episodic_life)
        self.games.reset(reset_infos)
        self.reset_frames_pending = True  # the first store puts the reset frames first, as episode starts

    @staticmethod
    def fields(n: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype) -> Fields:
        """What a vector step stages: the frame stacks acted on next (their last frames are stored), rewards,
        training terminations and episode starts."""
        return {
            "obs": ((n, *obs_shape), obs_dtype),
            "rewards": ((n,), torch.float32),
            "terminated": ((n,), torch.uint8),
            "starts": ((n,), torch.bool),
        }

    def fill(self, host: dict[str, np.ndarray], stepped: Stepped) -> list[tuple[float, int]]:
        """Write the vector step into the staging buffer; returns (raw whole-game score, length) of each game that
        ended in it."""
        next_obs, rewards, terminated, truncated, infos = stepped
        host["obs"][...] = next_obs
        rewards_into(host["rewards"], rewards, self.clip)
        train_terminated, starts, finished = self.games.step(rewards, terminated, truncated, infos)
        host["terminated"][...] = train_terminated
        host["starts"][...] = starts
        return list(finished.values())

    def store(self, obs_t: torch.Tensor, actions_t: torch.Tensor, dev: dict[str, torch.Tensor]) -> None:
        if self.reset_frames_pending:
            self.replay.add_resets(obs_t[:, -1])
            self.reset_frames_pending = False
        self.replay.add(dev["obs"][:, -1], actions_t, dev["rewards"], dev["terminated"], dev["starts"])


class Collector:
    """Steps `envs` with `learner`'s epsilon-greedy actions and stores every vector step in `replay`.

    Holds what the next step needs (the envs' last observations, on the device) and the episode bookkeeping: env
    steps and episodes in `counters`, the recent raw returns. It logs nothing: `finish` (and `collect`, both halves
    at once) returns the episodes that ended. With `overlap` the envs step between `start` and `finish` while the
    caller runs the updates (stepping.py).
    """

    def __init__(
        self,
        cfg: Config,
        envs: gym.vector.VectorEnv,
        replay: Replay,
        learner: DQNLearner,
        counters: Counters,
        device: torch.device,
        overlap: bool = False,
    ):
        self.cfg, self.envs, self.replay, self.learner, self.counters = cfg, envs, replay, learner, counters
        space = envs.single_observation_space
        shape = obs_shape(space)
        obs, reset_infos = envs.reset(seed=cfg.seed)
        self.writer: FrameWriter | TransitionWriter
        pixels = is_pixel_shape(shape)
        if pixels:
            assert isinstance(replay, FrameReplay), "pixel envs store frames (make_replay)"
            self.writer = FrameWriter(replay, cfg, reset_infos)
        else:
            self.writer = TransitionWriter(replay, cfg)
        self.staging = Staging(device, self.writer.fields(cfg.num_envs, shape, obs_dtype(space)))
        self.stepper = make_stepper(envs, device, overlap)
        self.obs_t = self.stage_obs(obs)
        self.actions_t: torch.Tensor | None = None
        # Exact env state goes into checkpoints where it is plain Python data: not for envs in subprocesses
        # (async), in C++ (pixel envs) or in objects the snapshot does not walk (MinAtar's games), whose resumed
        # runs start fresh episodes.
        self.snapshot_envs = not pixels and resolve_vector_mode(cfg) != "async" and not is_minatar_id(cfg.env_id)
        self.recent_returns: deque[float] = deque(maxlen=RECENT_EPISODES)
        self.generator: torch.Generator | None = None  # acting's random draws; None: torch's default generator

    def stage_obs(self, obs: np.ndarray) -> torch.Tensor:
        """Observations (after a reset) on the device, through the staging buffer."""
        self.staging.fill()["obs"][...] = obs
        return self.staging.send()["obs"]

    @property
    def obs(self) -> np.ndarray:
        """A host copy of the envs' last observations (those the next vector step acts on)."""
        return self.obs_t.cpu().numpy().copy()

    def start(self, actions_t: torch.Tensor | None = None, actions: np.ndarray | None = None) -> None:
        """Act in all envs on their last observations (or take `actions_t` and their host copy `actions`, from a
        population's batched acting, which copies all agents' actions at once) and start the envs' step."""
        if actions_t is None:
            actions_t = self.learner.act(self.obs_t, epsilon_at(self.cfg, self.counters.env_step), self.generator)
        self.actions_t = actions_t
        if actions is None:
            actions = self.staging.to_host(self.actions_t)  # the one device->host copy of a vector step
        self.learner.observe(self.obs_t)
        self.stepper.start(actions)

    def finish(self) -> list[tuple[float, int]]:
        """Collect the envs' step and store it; returns (raw return, length) of the episodes that ended (whole
        games for Atari), already counted."""
        finished = self.writer.fill(self.staging.fill(), self.stepper.finish())
        dev = self.staging.send()  # the one host->device copy of a vector step
        assert self.actions_t is not None, "finish() follows start()"
        self.writer.store(self.obs_t, self.actions_t, dev)
        self.obs_t = dev["obs"]
        self.counters.env_step += self.cfg.num_envs
        self.counters.episodes += len(finished)
        self.recent_returns.extend(ret for ret, _ in finished)
        return finished

    def collect(self) -> list[tuple[float, int]]:
        """`start` and `finish`: one whole vector step."""
        self.start()
        return self.finish()

    def close(self) -> None:
        """Drop a step still in flight (after an error between `start` and `finish`) so the envs can close."""
        self.stepper.close()

    def recent_return(self) -> float | None:
        """Mean raw return of the last RECENT_EPISODES finished episodes, None before the first."""
        return float(np.mean(self.recent_returns)) if self.recent_returns else None

    def state_dict(self) -> dict[str, Any]:
        """The envs' last observations, their exact state where it can be read, and the recent returns."""
        return {
            "obs": self.obs_t.cpu().clone(),
            "env_state": get_env_state(self.envs) if self.snapshot_envs else {},
            "recent_returns": list(self.recent_returns),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`; envs without a saved state keep their fresh reset."""
        if state["env_state"]:
            set_env_state(self.envs, state["env_state"])
            self.obs_t = self.stage_obs(state["obs"].numpy())
        self.recent_returns.extend(state["recent_returns"])
