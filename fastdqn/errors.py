"""Errors a user can fix, and the one line (problem and fix) that reports any error to a user.

The CLI prints each as one line and exits non-zero; experiments record the same line for a failed run.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


class FastDQNError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in fastdqn."""

    exit_code = 2


class ConfigError(FastDQNError):
    """A config key, value or file that cannot be used."""


class EnvError(FastDQNError):
    """An environment that does not exist or that DQN cannot drive."""


class CheckpointError(FastDQNError):
    """A run dir or checkpoint that cannot be resumed or evaluated."""


class DeviceError(FastDQNError):
    """A device that was asked for but is not present."""


class RunDirLocked(FastDQNError):
    """Another process is training in the run dir."""


class MissingExtra(FastDQNError):
    """A feature needs an optional dependency (an extra of fastdqn) that is not installed."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, or a MissingExtra naming the extra to install for `feature`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'fastdqn[{extra}]'") from None


class TrainingDiverged(FastDQNError):
    """The loss or Q-values became non-finite; the last finite state was checkpointed."""

    exit_code = 3


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:600] or type(exc).__name__


def describe(exc: BaseException) -> str:
    """The one line that reports `exc` to a user: fastdqn's own message, or `explain`'s for anything else."""
    return one_line(exc) if isinstance(exc, FastDQNError) else explain(exc)


def explain(exc: BaseException) -> str:
    """One line for an error raised outside fastdqn's own checks: what happened and what to try."""
    import gymnasium as gym

    torch = sys.modules.get("torch")
    text = one_line(exc)
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return f"out of device memory ({text[:200]}): lower batch_size, buffer_size or num_envs, or use --device cpu"
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return f"torch.compile failed ({type(exc).__name__}: {text[:300]}): run without --compile"
    if isinstance(exc, gym.error.Error):
        return f"gymnasium: {text}"
    if isinstance(exc, OSError):
        return f"{text}: check the path, its permissions and the free disk space"
    return f"unexpected {type(exc).__name__}: {text} (rerun with `fastdqn --debug ...` for the traceback and report it)"
