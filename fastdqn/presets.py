"""Per-env-family defaults that `Config` applies beneath the values it is given.

`Config(env_id="ALE/Pong-v5")` gets the published DQN settings for Atari, whether it was built in Python, from a
YAML file or from the command line; any key given explicitly wins over the preset. This module holds data only
(no gymnasium or torch), so the config layer can use it without heavy imports.
"""

from __future__ import annotations

from typing import Any

# The published DQN settings (Mnih et al. 2015, as in CleanRL's dqn_atari). In env steps: 1 env step is
# frame_skip emulator frames.
ATARI: dict[str, Any] = {
    "buffer_size": 1_000_000, "learning_starts": 80_000, "target_update_interval": 1_000, "learning_rate": 1e-4,
    "batch_size": 32, "train_every": 4, "gradient_steps": 1, "epsilon_start": 1.0, "epsilon_end": 0.01,
    "epsilon_decay_steps": 1_000_000, "total_steps": 10_000_000, "clip_rewards": True, "max_grad_norm": 10.0,
    "gamma": 0.99, "loss": "huber", "lr_schedule": "constant", "n_step": 1, "eval_every": 250_000, "eval_episodes": 10, "log_every": 10_000,
    "checkpoint_every": 500_000,
}


# The mean evaluation return at which an env counts as solved (gymnasium's reward_threshold for these ids). Envs
# not listed (Atari, MinAtar, any other) have no solve line: their reports and summaries show scores only.
SOLVE_LINES: dict[str, float] = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "MountainCar-v0": -110.0,
                                 "LunarLander-v3": 200.0}


def solve_line_of(env_id: str) -> float | None:
    """The env's own solve line, or None where it has none."""
    return SOLVE_LINES.get(env_id)


def is_atari_id(env_id: str) -> bool:
    return env_id.startswith("ALE/")


def preset_for(env_id: str) -> tuple[str, dict[str, Any]]:
    """(name, values) of the preset that applies to `env_id`; ("", {}) when none does."""
    if is_atari_id(env_id):
        return "atari", ATARI
    return "", {}
