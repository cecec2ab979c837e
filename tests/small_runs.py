"""Small CartPole runs for the reliability tests, with every setting they rely on pinned (not the tuned defaults)."""

from __future__ import annotations

from typing import Any

from fastdqn.config import Config

PINNED: dict[str, Any] = dict(
    env_id="CartPole-v1",
    num_envs=1,
    vector_mode="sync",
    device="cpu",
    torch_threads=1,
    total_steps=400,
    learning_starts=100,
    buffer_size=1000,
    batch_size=16,
    train_every=4,
    gradient_steps=1,
    learning_rate=1e-3,
    lr_schedule="constant",
    n_step=1,
    hidden_sizes=[16],
    target_update_interval=100,
    epsilon_decay_steps=1000,
    eval_every=0,
    eval_episodes=1,
    log_every=100,
    checkpoint_every=0,
    keep_checkpoints=3,
    save_replay=False,
)


def small_cfg(**changes: Any) -> Config:
    return Config(**{**PINNED, **changes}).validate()


def small_flags(**changes: Any) -> list[str]:
    """The same settings as `fastdqn train` flags."""
    flags: list[str] = []
    for key, value in {**PINNED, **changes}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value).replace(" ", "")]
    return flags
