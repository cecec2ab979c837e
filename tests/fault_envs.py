"""Misbehaving envs for the fault tests, registered on import (`--env fault_envs:FlakyCartPole-v0`)."""

from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class FlakyCartPole(CartPoleEnv):
    """CartPole whose `step` raises once it has been stepped `fail_at` times since it was built, if it was seeded
    with an even seed (env 1 of a vector env reset with seed 1: envs get seeds 1, 2, ...)."""

    def __init__(self, fail_at: int = 150, **kwargs):
        super().__init__(**kwargs)
        self.fail_at, self.steps_taken = fail_at, 0

    def step(self, action):
        self.steps_taken += 1
        if self.steps_taken >= self.fail_at and self.np_random_seed % 2 == 0:
            raise RuntimeError(f"simulator lost contact after {self.steps_taken} steps")
        return super().step(action)


class InfRewardCartPole(CartPoleEnv):
    """CartPole whose reward becomes +inf after `after` steps since it was built."""

    def __init__(self, after: int = 120, **kwargs):
        super().__init__(**kwargs)
        self.after, self.steps_taken = after, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps_taken += 1
        return obs, float("inf") if self.steps_taken > self.after else reward, terminated, truncated, info


class SlowCartPole(CartPoleEnv):
    """CartPole whose step takes `delay` seconds more, so that a test can stop or kill a run mid-way."""

    def __init__(self, delay: float = 0.005, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def step(self, action):
        time.sleep(self.delay)
        return super().step(action)


class InterruptingCartPole(CartPoleEnv):
    """CartPole that sends SIGINT to its own process in the middle of its `stop_at`-th step (as Ctrl-C would,
    while the step is in flight), if it was seeded with an odd seed (env 0 of a vector env reset with seed 1)."""

    def __init__(self, stop_at: int = 200, **kwargs):
        super().__init__(**kwargs)
        self.stop_at, self.steps_taken = stop_at, 0

    def step(self, action):
        self.steps_taken += 1
        if self.steps_taken == self.stop_at and self.np_random_seed % 2 == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return super().step(action)


class BrokenInit(CartPoleEnv):
    """An env whose constructor fails the way a misconfigured user env does."""

    def __init__(self, **kwargs):
        raise ValueError("track_length must be positive")


for name, cls, kwargs in (
    ("FlakyCartPole-v0", FlakyCartPole, {}),
    ("InfRewardCartPole-v0", InfRewardCartPole, {}),
    ("SlowCartPole-v0", SlowCartPole, {}),
    ("InterruptingCartPole-v0", InterruptingCartPole, {}),
    ("BrokenInit-v0", BrokenInit, {}),
):
    if name not in gym.registry:
        gym.register(name, entry_point=cls, max_episode_steps=500, kwargs=kwargs)


class DyingCartPole(CartPoleEnv):
    """CartPole whose process dies the way native code or the kernel kills it (`how`: segv, exit, hang) once it has
    been stepped `fail_at` times, if it was seeded with seed 2 (env 1 of a vector env reset with seed 1; an env
    started again gets another seed, so it dies once)."""

    def __init__(self, how: str = "segv", fail_at: int = 30, **kwargs):
        super().__init__(**kwargs)
        self.how, self.fail_at, self.steps_taken = how, fail_at, 0

    def step(self, action):
        self.steps_taken += 1
        if self.steps_taken >= self.fail_at and self.np_random_seed == 2:
            if self.how == "segv":
                # The default action, as for a crash with no handler: a library imported earlier in the test
                # process (pygame's "parachute") may have put in a handler that turns it into an abort.
                signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGSEGV)
            elif self.how == "exit":
                os._exit(3)
            time.sleep(3600)
        return super().step(action)


for how in ("segv", "exit", "hang"):
    if f"DyingCartPole-{how}-v0" not in gym.registry:
        gym.register(f"DyingCartPole-{how}-v0", entry_point=DyingCartPole, max_episode_steps=500, kwargs={"how": how})
