"""Test doubles for the core tests: a tiny counter env registered with gymnasium, and a Trainer driven without run().

The counter env makes every transition checkable: its observation is [t, marker], where t counts steps since
reset and marker is drawn once per episode, so a valid transition has next.t == obs.t + 1 and the same marker.
Episodes terminate at a random step in [2, 6] drawn at reset, and a 4-step time limit truncates the rest, so
envs of one vector env go out of phase and both kinds of episode end occur.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import gymnasium as gym
import numpy as np

from fastdqn.config import Config
from fastdqn.trainer import Trainer

COUNTER_ENV = "fastdqn_test/Counter-v0"  # float32 observations, reward 2.5 per step
COUNTER_ENV_U8 = "fastdqn_test/CounterU8-v0"  # the same with uint8 observations
TIME_LIMIT = 4
REWARD = 2.5


class CounterEnv(gym.Env):
    """obs = [t, marker]; terminates at step `terminate_at` in [2, 6]; constant reward."""

    def __init__(self, reward: float = REWARD, dtype: type = np.float32):
        self.reward, self.dtype = reward, dtype
        self.observation_space = gym.spaces.Box(0, 255, (2,), dtype)
        self.action_space = gym.spaces.Discrete(2)

    def _obs(self) -> np.ndarray:
        return np.array([self.t, self.marker], dtype=self.dtype)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        self.marker = int(self.np_random.integers(1, 250))
        self.terminate_at = int(self.np_random.integers(2, 7))
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), self.reward, self.t >= self.terminate_at, False, {}


for _id, _dtype in ((COUNTER_ENV, np.float32), (COUNTER_ENV_U8, np.uint8)):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=CounterEnv, max_episode_steps=TIME_LIMIT, kwargs={"dtype": _dtype})


# The update cadence the core tests count on (one env, one update every 4 env steps, the classic DQN learning
# rate held constant, 1-step returns), pinned so that retuning Config's defaults does not change what these
# tests measure.
CLASSIC = {
    "num_envs": 1,
    "train_every": 4,
    "gradient_steps": 1,
    "learning_rate": 1e-3,
    "lr_schedule": "constant",
    "n_step": 1,
}


def classic(cfg: Config, **changes: object) -> Config:
    """`cfg` with the classic update cadence, then `changes`."""
    return cfg.updated(**{**CLASSIC, **changes})


@contextlib.contextmanager
def trainer_without_run(cfg: Config, run_dir: Path) -> Iterator[Trainer]:
    """A Trainer whose collector and updates are driven step by step instead of by run(); closes its envs."""
    trainer = Trainer(cfg, run_dir, show_progress=False)
    try:
        yield trainer
    finally:
        trainer.envs.close()


def drive(trainer: Trainer, env_steps: int) -> None:
    """collect() + train() until `env_steps` env steps have been taken."""
    while trainer.counters.env_step < env_steps:
        trainer.collector.collect()
        trainer.train()
