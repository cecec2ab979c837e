"""Vector environments for DQN, with one explicit autoreset convention.

We use gymnasium's SAME_STEP autoreset: the step that ends an episode returns the *reset* observation of the
next episode, and the true final observation in `info["final_obs"]`. `true_next_obs` puts the final one back,
so every vector step yields exactly one valid transition per env and no stored transition ever pairs a final
observation with a reset one. `terminated` (a terminal state) stops bootstrapping; `truncated` (a time limit)
does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode

from fastdqn.atari import GRID_MAX_SIDE, is_atari_id, is_image_space, make_pixel_vector_env
from fastdqn.config import Config
from fastdqn.env_workers import WatchedAsyncVectorEnv
from fastdqn.errors import EnvError
from fastdqn.faults import EnvRestarts, guarded
from fastdqn.logs import console
from fastdqn.networks import is_grid_shape, is_pixel_shape
from fastdqn.registry import check_env_id

OBSERVATIONS_TAKEN = (
    "fastdqn takes a flat Box (a vector, to an MLP), an (H, W, C) Box grid of at least 3x3 cells "
    "(bool, integer or float, to the MinAtar CNN) or a uint8 screen, (H, W) or (H, W, C) and larger "
    f"than {GRID_MAX_SIDE}x{GRID_MAX_SIDE} (to the Nature CNN, as 84x84 grayscale frame stacks)"
)


def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
    """DQN needs a Discrete action space; fastdqn's networks take a flat Box observation, an (H, W, C) grid or a
    uint8 (C, 84, 84) frame stack (what the pixel envs make of screens)."""
    if not isinstance(action_space, gym.spaces.Discrete):
        raise EnvError(
            f"env '{env_id}' has action space {action_space}: DQN needs a Discrete action space "
            "(use SAC/TD3 for continuous actions, or discretize the env)"
        )
    if int(action_space.start) != 0:  # the Q-network's argmax picks actions 0..n-1
        raise EnvError(
            f"env '{env_id}' has action space {action_space}, whose actions start at {action_space.start}: "
            "fastdqn's actions are 0..n-1; wrap the env to shift them (gymnasium.wrappers.TransformAction)"
        )
    if isinstance(observation_space, gym.spaces.Box):
        shape = tuple(observation_space.shape)
        if is_pixel_shape(shape) and observation_space.dtype == np.uint8:
            return  # frame stacks from fastdqn.atari, for the Nature CNN
        if len(shape) == 1 or is_grid_shape(shape) and not is_image_space(observation_space):
            return  # vectors for the MLP, grids for the MinAtar CNN (screens have become frame stacks)
    raise EnvError(
        f"env '{env_id}' has observation space {observation_space}: {OBSERVATIONS_TAKEN}; wrap the env to "
        "give one of them (e.g. gymnasium.wrappers.FlattenObservation)"
    )


def _env_factory(cfg: Config, index: int) -> Callable[[], gym.Env]:
    def make() -> gym.Env:
        kwargs: dict[str, Any] = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps > 0 else {}
        env = gym.make(cfg.env_id, **kwargs)
        # Returns and lengths of whole episodes, recorded before any reward processing.
        return gym.wrappers.RecordEpisodeStatistics(env)

    return make


class SameStepCartPole(CartPoleVectorEnv):
    """gymnasium's numpy CartPole (one array operation steps every env, several times cheaper than N Python envs)
    turned into a drop-in for the SyncVectorEnv of `CartPole-v*`: the same physics and time limit, SAME_STEP
    autoreset (`final_obs`) and RecordEpisodeStatistics' `final_info["episode"]`. gymnasium's class resets a
    finished env at the next step; here it is reset, with the same draw, in the step that finished it.
    """

    metadata = {**CartPoleVectorEnv.metadata, "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int, max_episode_steps: int, **kwargs: Any):
        super().__init__(num_envs=num_envs, max_episode_steps=max_episode_steps, **kwargs)
        self.episode_returns = np.zeros(num_envs)
        self.episode_lengths = np.zeros(num_envs, dtype=np.int64)
        self.constants = kwargs  # the spec's keywords, for `with_envs`

    def with_envs(self, num_envs: int) -> SameStepCartPole:
        """A CartPole of `num_envs` envs with this one's time limit and constants (`step_together`'s engine)."""
        return SameStepCartPole(num_envs, self.max_episode_steps, **self.constants)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        self.episode_returns[:] = 0.0
        self.episode_lengths[:] = 0
        return super().reset(seed=seed, options=options)

    def reset_each(self, seeds: list[int]) -> np.ndarray:
        """Reset, env i to the start state `CartPole-v*` reset with seeds[i] draws (the same generator, the same
        draw), so that its episode is that env's, step for step; returns the observations. Later resets draw
        from the generator of seeds[0]."""
        assert len(seeds) == self.num_envs, "one seed per env"
        self.reset(seed=seeds[0])
        assert self.state is not None, "reset() sets it"
        for i, seed in enumerate(seeds):
            self.state[:, i] = seeding.np_random(seed)[0].uniform(low=self.low, high=self.high, size=(4,))
        return self.state.T.astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, _ = super().step(action)
        return self.finish_step(obs, reward, terminated, truncated)

    def finish_step(
        self, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """What follows the physics of a step: episode statistics, and the reset of every env that just finished,
        drawn from this env's generator, its final observation kept in `info`."""
        self.episode_returns += reward
        self.episode_lengths += 1
        done = terminated | truncated
        if not done.any():
            return obs, reward, terminated, truncated, {}
        final_obs = obs.copy()
        assert self.state is not None, "reset() came first"
        self.state[:, done] = self.np_random.uniform(low=self.low, high=self.high, size=(4, int(done.sum())))
        self.steps[done] = 0
        self.prev_done[:] = False  # reset already: the parent's next step must not reset them again
        obs[done] = self.state[:, done].T
        episode = {"r": self.episode_returns.copy(), "l": self.episode_lengths.copy()}
        self.episode_returns[done] = 0.0
        self.episode_lengths[done] = 0
        info = {
            "final_obs": final_obs,
            "_final_obs": done,
            "final_info": {"episode": episode, "_episode": done},
            "_final_info": done,
        }
        return obs, reward, terminated, truncated, info


def step_together(
    envs: Sequence[SameStepCartPole], actions: Sequence[np.ndarray], engine: SameStepCartPole
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Step several CartPole vector envs (a population's agents') as one: the physics of all of them in one numpy
    step of `engine` (a CartPole of as many envs, with the same constants), then each env finishes its own step
    (`finish_step`: its resets from its own generator). What each env returns, and the state it is left in, are
    what its own `step` gives, for one numpy step instead of one per env."""
    assert len({env.max_episode_steps for env in envs}) == 1, "one time limit for all"
    bounds = np.cumsum([0, *(env.num_envs for env in envs)])
    state = np.concatenate([env.state for env in envs], axis=1)
    engine.state = state  # type: ignore[assignment]  # gymnasium types it as None, its value before a reset
    engine.steps = np.concatenate([env.steps for env in envs])
    engine.prev_done = np.zeros(engine.num_envs, dtype=np.bool_)  # finished envs were reset in their own step
    obs, reward, terminated, truncated, _ = CartPoleVectorEnv.step(engine, np.concatenate(actions))
    state = cast(np.ndarray, engine.state)  # the step's new state array
    stepped = []
    for env, lo, hi in zip(envs, bounds[:-1], bounds[1:]):
        env.state, env.steps = state[:, lo:hi], engine.steps[lo:hi]  # type: ignore[assignment]  # as above
        stepped.append(env.finish_step(obs[lo:hi], reward[lo:hi], terminated[lo:hi], truncated[lo:hi]))
    return stepped


NATIVE_ENTRY_POINT = "gymnasium.envs.classic_control.cartpole:CartPoleVectorEnv"


def has_native_vector_env(env_id: str) -> bool:
    """Does gymnasium implement `env_id` as one vectorized (numpy) env that fastdqn can run SAME_STEP?"""
    return getattr(gym.registry.get(env_id), "vector_entry_point", None) == NATIVE_ENTRY_POINT


def make_native_vector_env(cfg: Config, num_envs: int) -> gym.vector.VectorEnv:
    if not has_native_vector_env(cfg.env_id):
        raise EnvError(
            f"env '{cfg.env_id}' has no native vectorized implementation (gymnasium has one for CartPole "
            "only): use vector_mode auto or sync"
        )
    spec = gym.spec(cfg.env_id)
    limit = cfg.max_episode_steps or spec.max_episode_steps
    assert limit is not None, "gymnasium's CartPole ids have a time limit"
    return SameStepCartPole(num_envs, limit, **spec.kwargs)


NATIVE_FROM = 6  # envs from which one numpy step of all beats stepping Python envs one by one (this project's CPU)


def resolve_vector_mode(cfg: Config) -> str:
    """sync, async or native; `auto` is native where gymnasium has a vectorized env (CartPole) for NATIVE_FROM envs
    or more, else sync: below that, stepping one Python env per env is faster than one numpy step of all (with 1
    env the whole CleanRL comparison of `fastdqn bench --suite cleanrl` went from 0.95x to 1.06x of dqn.py)."""
    if cfg.vector_mode != "auto":
        return cfg.vector_mode
    return "native" if has_native_vector_env(cfg.env_id) and cfg.num_envs >= NATIVE_FROM else "sync"


def make_vector_env(cfg: Config, num_envs: int, *, mode: str | None = None) -> gym.vector.VectorEnv:
    """`num_envs` copies of `cfg.env_id` in a SAME_STEP-autoreset vector env; `mode` (sync, async, native)
    overrides `cfg.vector_mode`.

    Pixel envs (ALE ids, image observations) come from `atari.make_pixel_vector_env` instead: NEXT_STEP
    autoreset and (frame_stack, 84, 84) uint8 stacks, which the trainer stores with `FrameReplay`.
    """
    check_env_id(cfg.env_id)
    mode = mode or resolve_vector_mode(cfg)
    if mode == "native" and cfg.env_restarts > 0:
        console.print(
            "[yellow]warning: env_restarts guards sync and async envs; the native vector env steps all "
            "envs as one array and is not guarded (use vector_mode sync to guard each env)[/]"
        )
    use_async = mode == "async"
    try:
        if mode == "native":
            envs = make_native_vector_env(cfg, num_envs)
        elif is_atari_id(cfg.env_id):
            envs = make_pixel_vector_env(cfg, num_envs, asynchronous=use_async)
        else:
            restarts = [EnvRestarts(i, cfg) for i in range(num_envs)]
            fns = [guarded(_env_factory(cfg, i), restarts[i]) for i in range(num_envs)]
            envs = (
                WatchedAsyncVectorEnv(fns, cfg, restarts, autoreset_mode=AutoresetMode.SAME_STEP)
                if use_async
                else gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
            )
            if is_image_space(envs.single_observation_space):
                envs.close()
                envs = make_pixel_vector_env(cfg, num_envs, asynchronous=use_async)
    except gym.error.Error as exc:
        raise EnvError(f"cannot create env '{cfg.env_id}': {exc}") from None
    try:
        check_spaces(cfg.env_id, envs.single_observation_space, envs.single_action_space)
    except EnvError:
        envs.close()
        raise
    return envs


def obs_dtype(space: gym.Space) -> torch.dtype:
    """How observations are stored and sent to the device: uint8 and bool ones as uint8 (frames, grids: a byte a
    cell; the networks make them float), all others as float32."""
    return torch.uint8 if space.dtype in (np.uint8, np.bool_) else torch.float32


def true_next_obs(next_obs: np.ndarray, infos: dict[str, Any], out: np.ndarray | None = None) -> np.ndarray:
    """The observation each env really reached: the final one where an episode just ended, put back with one
    masked assignment (no loop over the envs). Written into `out` when given; without it `next_obs` itself is
    returned when no episode ended, else a copy."""
    ended = infos.get("_final_obs")
    ended = ended if ended is not None and ended.any() else None
    if out is None:
        if ended is None:
            return next_obs
        out = next_obs.copy()
    else:
        out[...] = next_obs
    if ended is not None:
        final = infos["final_obs"][ended]  # an (N, ...) array, or per-env objects (None where none ended)
        out[ended] = np.stack(final) if final.dtype == object else final
    return out


def finished_episodes(infos: dict[str, Any]) -> list[tuple[float, int]]:
    """(return, length) of each episode that ended in this vector step, as recorded before reward clipping."""
    final = infos.get("final_info")
    if not final or "episode" not in final:
        return []
    ep, mask = final["episode"], final["_episode"]
    return [(float(ep["r"][i]), int(ep["l"][i])) for i in np.flatnonzero(mask)]


# --- exact env state for checkpoints ------------------------------------------------------------------------
# A pure-Python env's state is its attributes (numbers, arrays, RNG states). We walk the vector env and its
# wrappers and copy those plain-data attributes, as tensors and Python scalars, so a checkpoint can restore the
# envs mid-episode while still loading with torch.load(weights_only=True). Envs whose state lives elsewhere (C
# extensions, subprocesses) are restored as far as their plain attributes go; see docs/reliability.md.

_SCALARS = (bool, int, float, str, type(None))


def _is_env(obj: Any) -> bool:
    return isinstance(obj, (gym.Env, gym.vector.VectorEnv))


def _encode(value: Any) -> tuple[bool, Any]:
    if isinstance(value, _SCALARS):
        return True, value
    if isinstance(value, np.random.Generator):
        return True, {"__rng__": value.bit_generator.state}
    if isinstance(value, np.ndarray) and value.dtype != object:
        return True, {"__ndarray__": torch.from_numpy(np.array(value, copy=True)), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return True, value.item()
    return False, None


def _decode(value: Any, current: Any) -> Any:
    if isinstance(value, dict) and "__rng__" in value:
        current.bit_generator.state = value["__rng__"]
        return current
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy().astype(value["dtype"], copy=True)
    return value


def get_env_state(envs: gym.vector.VectorEnv) -> dict[str, Any]:
    """Plain-data snapshot of a vector env and every wrapper and env inside it, keyed by attribute path."""
    state: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        for name, value in vars(obj).items():
            key = f"{path}.{name}" if path else name
            if _is_env(value):
                walk(value, key)
            elif isinstance(value, (list, tuple)) and value and all(_is_env(v) for v in value):
                for i, child in enumerate(value):
                    walk(child, f"{key}.{i}")
            else:
                ok, encoded = _encode(value)
                if ok:
                    state[key] = encoded

    walk(envs, "")
    return state


def set_env_state(envs: gym.vector.VectorEnv, state: dict[str, Any]) -> None:
    """Restore a snapshot made by `get_env_state` into envs built from the same config."""
    for key, value in state.items():
        *parents, name = key.split(".")
        obj: Any = envs
        for part in parents:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        setattr(obj, name, _decode(value, getattr(obj, name, None)))
