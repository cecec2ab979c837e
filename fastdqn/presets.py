"""Per-env-family defaults that `Config` applies beneath the values it is given.

`Config(env_id="ALE/Pong-v5")` gets the published DQN settings for Atari, and a MinAtar id the MinAtar paper's,
whether it was built in Python, from a YAML file or from the command line; any key given explicitly wins over the
preset. This module holds data only (no gymnasium or torch), so the config layer can use it without heavy imports.
"""

from __future__ import annotations

from typing import Any

# The published DQN settings (Mnih et al. 2015, as in CleanRL's dqn_atari). In env steps: 1 env step is
# frame_skip emulator frames.
ATARI: dict[str, Any] = {
    "buffer_size": 1_000_000,
    "learning_starts": 80_000,
    "target_update_interval": 1_000,
    "learning_rate": 1e-4,
    "batch_size": 32,
    "train_every": 4,
    "gradient_steps": 1,
    "epsilon_start": 1.0,
    "epsilon_end": 0.01,
    "epsilon_decay_steps": 1_000_000,
    "total_steps": 10_000_000,
    "clip_rewards": True,
    "max_grad_norm": 10.0,
    "gamma": 0.99,
    "loss": "huber",
    "lr_schedule": "constant",
    "n_step": 1,
    "eval_every": 250_000,
    "eval_episodes": 10,
    "log_every": 10_000,
    "checkpoint_every": 500_000,
}


# The mean evaluation return at which an env counts as solved (gymnasium's reward_threshold for these ids). Envs
# not listed (Atari, MinAtar, any other) have no solve line: their reports and summaries show scores only.
SOLVE_LINES: dict[str, float] = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MountainCar-v0": -110.0,
    "LunarLander-v3": 200.0,
}


def solve_line_of(env_id: str) -> float | None:
    """The env's own solve line, or None where it has none."""
    return SOLVE_LINES.get(env_id)


# The MinAtar paper's DQN (Young & Tian 2019, and its examples/dqn.py): replay 100k, batch 32, one update per env
# step, target copy every 1000, epsilon 1 -> 0.1 over 100k steps after 5000 random ones, gamma 0.99, Huber loss, no
# gradient clipping, no Double DQN, a constant step size, 1-step returns, 5M steps (one env step is one frame: MinAtar
# has no frame skip). The paper uses centered RMSprop (lr 2.5e-4, alpha 0.95, momentum 0.95, eps 0.01); fastdqn uses
# Adam at the same lr, with the larger epsilon Dopamine's Adam agents use (0.01 / batch size) in the role of
# RMSprop's. configs/minatar.yaml spells it out.
MINATAR: dict[str, Any] = {
    "buffer_size": 100_000,
    "batch_size": 32,
    "train_every": 1,
    "gradient_steps": 1,
    "target_update_interval": 1_000,
    "learning_rate": 2.5e-4,
    "adam_eps": 3.125e-4,
    "learning_starts": 5_000,
    "epsilon_start": 1.0,
    "epsilon_end": 0.1,
    "epsilon_decay_steps": 100_000,
    "gamma": 0.99,
    "loss": "huber",
    "max_grad_norm": 0.0,
    "double_dqn": False,
    "lr_schedule": "constant",
    "n_step": 1,
    "total_steps": 5_000_000,
    "eval_every": 100_000,
    "eval_episodes": 10,
    "log_every": 10_000,
    "checkpoint_every": 500_000,
}


def is_atari_id(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def is_minatar_id(env_id: str) -> bool:
    return env_id.startswith("MinAtar/")


def preset_for(env_id: str) -> tuple[str, dict[str, Any]]:
    """(name, values) of the preset that applies to `env_id`; ("", {}) when none does."""
    if is_atari_id(env_id):
        return "atari", ATARI
    if is_minatar_id(env_id):
        return "minatar", MINATAR
    return "", {}
