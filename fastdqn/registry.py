"""Env ids: the families fastdqn registers with gymnasium itself (ALE through ale-py, MinAtar, `module:Env-v0`)
and a one-line refusal of an id nothing registers."""

from __future__ import annotations

import difflib
import importlib

import gymnasium as gym

from fastdqn.errors import EnvError
from fastdqn.presets import is_minatar_id


def check_env_id(env_id: str) -> None:
    """Raise EnvError, with close matches, if gymnasium does not know `env_id`."""
    module, sep, name = env_id.rpartition(":")
    if sep:  # gymnasium's "package.module:Env-v0" form: importing the module registers its envs
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise EnvError(
                f"cannot import module '{module}' of env '{env_id}' ({exc}): check its name and "
                "that it is on PYTHONPATH"
            ) from None
        env_id = name
    if env_id in gym.registry:
        return
    if env_id.startswith("ALE/"):
        try:  # ale-py registers its envs on import
            import ale_py

            gym.register_envs(ale_py)
        except ImportError:
            raise EnvError(f"env '{env_id}' needs ale-py: pip install 'fastdqn[atari]'") from None
        if env_id in gym.registry:
            return
    if is_minatar_id(env_id):
        try:  # minatar's ids (MinAtar/<Game>-v0 all six actions, -v1 each game's own) exist once it registers them
            from minatar.gym import register_envs
        except ImportError:
            raise EnvError(f"env '{env_id}' needs minatar: pip install 'fastdqn[minatar]'") from None
        if "MinAtar/Breakout-v0" not in gym.registry:  # registering twice would warn about every id
            register_envs()
        if env_id in gym.registry:
            return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "see gymnasium's registry for ids"
    raise EnvError(f"unknown env id '{env_id}': {hint}")
