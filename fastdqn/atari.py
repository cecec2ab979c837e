"""Pixel environments: Atari through ale-py's C++ vector env, and a gymnasium fallback for any pixel env.

Both backends give (frame_stack, 84, 84) uint8 grayscale stacks, zero-padded at episode starts, and autoreset
in NEXT_STEP mode: the step after an episode end ignores its action and returns the reset observation. Every
vector step thus yields exactly one new frame per env, the true final frame included, which is what
`FrameReplay` stores (so no stored transition pairs the last frame of one episode with the first of the next,
and no frame stack mixes two episodes). Rewards come out raw; the trainer clips the ones it stores. Lives
are not episodes here: the envs end an episode only at game over, and `GameTracker` turns a lost life into a
training termination (`episodic_life`) while it reports whole-game scores.

ale_vector (default for ALE/* ids): `ale_py.vector_env.AtariVectorEnv`, C++ threads doing frame skip with
max-pooling, noop starts, fire reset, resize and stacking. gymnasium: `gym.make(id, frameskip=1)` +
`AtariPreprocessing` + `FireReset` + `FrameStackObservation` (AtariPreprocessing does the skipping; a v5 env
skipping frames too would make each action last 16 frames); other pixel envs get grayscale + resize + stack.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from fastdqn.config import Config
from fastdqn.env_workers import WatchedAsyncVectorEnv
from fastdqn.errors import EnvError
from fastdqn.presets import is_atari_id
from fastdqn.registry import check_env_id
from fastdqn.spaces import obs_shape

SCREEN = 84
GRID_MAX_SIDE = 32  # uint8 (H, W, C) observations up to this size are grids (MinAtar, MiniGrid), not screens


def is_image_space(space: gym.Space) -> bool:
    """A uint8 Box of shape (H, W), or (H, W, C) larger than a grid: a screen that needs grayscale, resize and
    stacking. Grids go to the network as they are."""
    if not isinstance(space, gym.spaces.Box) or space.dtype != np.uint8:
        return False
    shape = space.shape
    return len(shape) == 2 or len(shape) == 3 and max(shape[:2]) > GRID_MAX_SIDE


def rom_name(env_id: str) -> str:
    """'ALE/MsPacman-v5' -> 'ms_pacman', the ROM name ale-py's vector env takes."""
    game = env_id.split("/", 1)[1].rsplit("-v", 1)[0]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", game).lower()


# --- single gymnasium envs (the fallback; also used to record videos) ---------------------------------------
class FireReset(gym.Wrapper):
    """Press FIRE once after each reset, for games that wait for it (ale-py's vector env does the same)."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.env.reset(**kwargs)
        obs, _, terminated, truncated, info = self.env.step(1)
        if terminated or truncated:
            obs, info = self.env.reset(**kwargs)
        return obs, info


def make_pixel_env(cfg: Config, render_mode: str | None = None) -> gym.Env:
    """One preprocessed pixel env through gymnasium wrappers: (frame_stack, 84, 84) uint8 observations."""
    check_env_id(cfg.env_id)  # ALE's ids exist once ale-py registers them (also in a fresh env worker)
    if is_atari_id(cfg.env_id):
        env = gym.make(
            cfg.env_id,
            frameskip=1,
            repeat_action_probability=cfg.repeat_action_probability,
            full_action_space=cfg.full_action_space,
            render_mode=render_mode,
        )
        env = gym.wrappers.AtariPreprocessing(
            env, noop_max=cfg.noop_max, frame_skip=cfg.frame_skip, screen_size=SCREEN, terminal_on_life_loss=False
        )
        ale: Any = env.unwrapped  # ale-py's AtariEnv, which carries no type information
        if cfg.fire_reset and ale.get_action_meanings()[1:2] == ["FIRE"]:
            env = FireReset(env)
        if cfg.max_episode_steps:  # in agent steps after the no-op start, as ale-py's vector env counts them
            env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
    else:
        kwargs: dict[str, Any] = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps > 0 else {}
        if render_mode is not None:
            kwargs["render_mode"] = render_mode
        env = gym.make(cfg.env_id, **kwargs)
        if not is_image_space(env.observation_space):
            raise EnvError(
                f"env '{cfg.env_id}' has observation space {env.observation_space}: the pixel path needs "
                "uint8 (H, W) or (H, W, C) screens"
            )
        if len(obs_shape(env.observation_space)) == 3:
            env = gym.wrappers.GrayscaleObservation(env)
        env = gym.wrappers.ResizeObservation(env, (SCREEN, SCREEN))
    return gym.wrappers.FrameStackObservation(env, cfg.frame_stack, padding_type="zero")


# --- vector envs --------------------------------------------------------------------------------------------
def make_ale_vector_env(cfg: Config, num_envs: int) -> gym.vector.VectorEnv:
    """ale-py's C++ vector env with the DQN preprocessing, raw rewards and game-over-only episodes."""
    from ale_py import roms
    from ale_py.vector_env import AtariVectorEnv

    game = rom_name(cfg.env_id)
    if roms.get_rom_path(game) is None:
        raise EnvError(
            f"ale-py has no ROM '{game}' for env '{cfg.env_id}': check the id, or use --atari-backend gymnasium"
        )
    threads = cfg.env_threads or min(num_envs, os.cpu_count() or 1)
    frames = cfg.max_episode_steps * cfg.frame_skip if cfg.max_episode_steps else 108_000
    return AtariVectorEnv(
        game,
        num_envs,
        num_threads=threads,
        max_num_frames_per_episode=frames,
        repeat_action_probability=cfg.repeat_action_probability,
        full_action_space=cfg.full_action_space,
        autoreset_mode=AutoresetMode.NEXT_STEP,
        img_height=SCREEN,
        img_width=SCREEN,
        grayscale=True,
        stack_num=cfg.frame_stack,
        frameskip=cfg.frame_skip,
        maxpool=True,
        noop_max=cfg.noop_max,
        episodic_life=False,
        life_loss_info=False,
        reward_clipping=False,
        use_fire_reset=cfg.fire_reset,
    )


def make_pixel_vector_env(cfg: Config, num_envs: int, *, asynchronous: bool | None = None) -> gym.vector.VectorEnv:
    """`num_envs` pixel envs with NEXT_STEP autoreset: ale-py's vector env for ALE ids, else gymnasium's."""
    if is_atari_id(cfg.env_id) and cfg.atari_backend == "ale_vector":
        return make_ale_vector_env(cfg, num_envs)
    use_async = cfg.vector_mode == "async" if asynchronous is None else asynchronous
    fns: list[Callable[[], gym.Env]] = [lambda: make_pixel_env(cfg) for _ in range(num_envs)]
    if use_async:
        return WatchedAsyncVectorEnv(fns, cfg, autoreset_mode=AutoresetMode.NEXT_STEP)
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.NEXT_STEP)


# --- episodes of NEXT_STEP pixel envs ----------------------------------------------------------------------
class GameTracker:
    """Per-env bookkeeping of NEXT_STEP pixel envs: which observations start an episode, which transitions end a
    training episode (game over, or a lost life with `episodic_life`), and the raw score of each whole game."""

    def __init__(self, num_envs: int, episodic_life: bool):
        self.episodic_life = episodic_life
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.ended = np.zeros(num_envs, dtype=bool)  # the env's last step ended its game: this step resets
        self.lives: np.ndarray | None = None

    def reset(self, infos: dict[str, Any]) -> None:
        """After `envs.reset()`: every env starts a fresh game."""
        self.returns[:] = 0.0
        self.lengths[:] = 0
        self.ended[:] = False
        self.lives = self._lives(infos)

    @staticmethod
    def _lives(infos: dict[str, Any]) -> np.ndarray | None:
        return np.asarray(infos["lives"]).copy() if "lives" in infos else None

    def step(
        self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, infos: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[float, int]]]:
        """Account one vector step of raw rewards.

        Returns (train_terminated, starts, finished): `starts[e]` says env e returned a reset observation (its slot
        holds no transition); `train_terminated` adds life losses to game overs when `episodic_life` is on;
        `finished` maps each env whose game ended now to (raw score, length in env steps).
        """
        starts = self.ended.copy()
        lives = self._lives(infos)
        train_terminated = np.asarray(terminated, dtype=bool).copy()
        if self.episodic_life and lives is not None and self.lives is not None:
            train_terminated |= (lives < self.lives) & ~starts
        playing = ~starts
        self.returns[playing] += rewards[playing]
        self.lengths[playing] += 1
        self.ended = (np.asarray(terminated) | np.asarray(truncated)) & playing
        finished = {int(i): (float(self.returns[i]), int(self.lengths[i])) for i in np.flatnonzero(self.ended)}
        self.returns[self.ended] = 0.0
        self.lengths[self.ended] = 0
        self.lives = lives
        return train_terminated, starts, finished


def evaluate_games(
    envs: gym.vector.VectorEnv, policy: Callable[[torch.Tensor], torch.Tensor], seeds: list[int], device: torch.device
) -> np.ndarray:
    """Raw score of the first whole game of each env of a NEXT_STEP pixel vector env, env i reset with seeds[i]."""
    gymnasium_envs = isinstance(envs, (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv))
    seed: Any = list(seeds) if gymnasium_envs else np.asarray(seeds, dtype=np.int64)  # one per env; VectorEnv says int
    obs, infos = envs.reset(seed=seed)
    tracker = GameTracker(len(seeds), episodic_life=False)
    tracker.reset(infos)
    returns = np.full(len(seeds), np.nan)
    while np.isnan(returns).any():
        actions = policy(torch.as_tensor(obs, device=device)).cpu().numpy()
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        for i, (score, _length) in tracker.step(rewards, terminated, truncated, infos)[2].items():
            if np.isnan(returns[i]):
                returns[i] = score
    return returns
