"""Epsilon and learning-rate schedules: pure functions of the env-step count (host ints, no device sync)."""

from __future__ import annotations

import math

from fastdqn.config import Config


def epsilon_at(cfg: Config, step: int) -> float:
    """Exploration rate after `step` env steps.

    linear:      start -> end in `epsilon_decay_steps`, then flat at end.
    exponential: end + (start - end) * exp(-step / epsilon_decay_steps).
    step:        start * epsilon_step_factor ** (step // epsilon_decay_steps), floored at end.
    constant:    start.
    """
    start, end, span = cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps
    if cfg.epsilon_schedule == "linear":
        return start + (end - start) * min(step / span, 1.0)
    if cfg.epsilon_schedule == "exponential":
        return end + (start - end) * math.exp(-step / span)
    if cfg.epsilon_schedule == "step":
        return max(end, start * cfg.epsilon_step_factor ** (step // span))
    return start


def learning_rate_at(cfg: Config, step: int) -> float:
    """Learning rate after `step` env steps: constant, or linear from learning_rate to lr_end at total_steps."""
    if cfg.lr_schedule == "linear":
        return _over_training(cfg, step, cfg.learning_rate, cfg.lr_end)
    return cfg.learning_rate


def per_beta_at(cfg: Config, step: int) -> float:
    """Prioritized replay's importance-weight exponent: linear from per_beta_start to per_beta_end at total_steps."""
    return _over_training(cfg, step, cfg.per_beta_start, cfg.per_beta_end)


def _over_training(cfg: Config, step: int, start: float, end: float) -> float:
    """Linear interpolation from `start` at step 0 to `end` at total_steps, flat after."""
    return start + (end - start) * min(step / cfg.total_steps, 1.0)
