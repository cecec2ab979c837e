"""What fastdqn reads from gymnasium spaces, typed: one observation's shape and the number of actions.

gymnasium types `Space.shape` as optional and gives the base `Space` no `n`. `envs.check_spaces` has made sure that
a run's observation space has a shape and its action space is Discrete; these say so in one place.
"""

from __future__ import annotations

import gymnasium as gym


def obs_shape(space: gym.Space) -> tuple[int, ...]:
    """The shape of one observation of `space`."""
    if space.shape is None:
        raise TypeError(f"observation space {space} has no shape")
    return tuple(space.shape)


def n_actions(space: gym.Space) -> int:
    """The number of actions of a Discrete `space`."""
    if not isinstance(space, gym.spaces.Discrete):
        raise TypeError(f"action space {space} is not Discrete")
    return int(space.n)
