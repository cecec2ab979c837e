"""`fastdqn eval --video`: record one greedy episode (a whole game for Atari) as an mp4, or a gif without a codec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from fastdqn.atari import is_atari_id, is_image_space, make_pixel_env
from fastdqn.config import Config
from fastdqn.disk import run_write
from fastdqn.errors import EnvError

FPS = 30


def make_render_env(cfg: Config) -> gym.Env:
    """One env that renders RGB frames and gives the observations the policy was trained on."""
    if is_atari_id(cfg.env_id):
        return make_pixel_env(cfg, render_mode="rgb_array")
    kwargs: dict[str, Any] = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps > 0 else {}
    env = gym.make(cfg.env_id, render_mode="rgb_array", **kwargs)
    if is_image_space(env.observation_space):
        env.close()
        return make_pixel_env(cfg, render_mode="rgb_array")
    return env


def record_episode(
    policy: Callable[[torch.Tensor], torch.Tensor], cfg: Config, seed: int, device: torch.device
) -> tuple[list[np.ndarray], float]:
    """RGB frames of one episode played by `policy` from a reset with `seed`, and its raw return."""
    env = make_render_env(cfg)
    try:
        obs, _ = env.reset(seed=seed)
        try:
            frames, total, done = [np.asarray(env.render())], 0.0, False
        except gym.error.DependencyNotInstalled as exc:
            raise EnvError(f"--video cannot render '{cfg.env_id}' ({exc})") from None
        while not done:
            action = int(policy(torch.as_tensor(np.asarray(obs)[None], device=device))[0])
            obs, reward, terminated, truncated, _ = env.step(action)
            frames.append(np.asarray(env.render()))
            total += float(reward)
            done = terminated or truncated
        return frames, total
    finally:
        env.close()


def write_video(frames: list[np.ndarray], path: Path) -> Path:
    """Write RGB frames to `path` (.mp4 through OpenCV); falls back to a .gif beside it if no mp4 codec opens.

    OpenCV reports no failed write (a full disk leaves a cut file and a warning per frame), so its warnings are
    silenced and the file is read back: one that lacks frames is removed and reported.
    """
    import cv2

    height, width = frames[0].shape[:2]
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, (width, height))
        if writer.isOpened():
            try:
                with run_write(path, "a video", opaque=True):
                    for frame in frames:
                        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
                    writer.release()
                    check_frames(path, len(frames))
            except Exception:
                path.unlink(missing_ok=True)  # a cut video plays as if whole in some players
                raise
            return path
    finally:
        cv2.utils.logging.setLogLevel(level)
    from PIL import Image

    gif = path.with_suffix(".gif")
    images = [Image.fromarray(f) for f in frames]
    with run_write(gif, "a video"):
        images[0].save(gif, save_all=True, append_images=images[1:], duration=1000 // FPS, loop=0)
    return gif


def check_frames(path: Path, expected: int) -> None:
    """Raise OSError if the video at `path` does not hold `expected` frames."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    found = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    capture.release()
    if found < expected:
        raise OSError(f"OpenCV wrote {found} of {expected} frames to '{path}'")
