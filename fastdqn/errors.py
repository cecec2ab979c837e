"""Errors a user can fix, and the one line (problem and fix) that reports any error to a user.

The CLI prints each as one line and exits non-zero; experiments record the same line for a failed run.
"""

from __future__ import annotations

import errno
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


class DiskFull(FastDQNError):
    """A write of a run failed for lack of disk space or quota; the newest complete checkpoint is intact.

    The message names the path, what the write needed, what is free and `fix`; `with_fix` swaps the fix for one
    that knows the run (its checkpoints, how to resume it).
    """

    exit_code = 1

    def __init__(
        self,
        path: object,
        what: str,
        need: str,
        free: str,
        quota: bool = False,
        fix: str = "free space there and run the command again",
    ):
        self.path, self.what, self.need, self.free, self.quota, self.fix = path, what, need, free, quota, fix
        problem = "disk quota exceeded" if quota else "no space left on device"
        super().__init__(f"{problem} writing {what} '{path}' (it needs {need}, {free} free there): {fix}")

    def with_fix(self, fix: str) -> DiskFull:
        return DiskFull(self.path, self.what, self.need, self.free, self.quota, fix)


class MissingExtra(FastDQNError):
    """A feature needs an optional dependency (an extra of fastdqn) that is not installed."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """`module`, or a MissingExtra naming the extra to install for `feature`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{feature} needs {module.split('.')[0]}, which is not installed: pip install 'fastdqn[{extra}]'"
        ) from None


class TrainingDiverged(FastDQNError):
    """The loss or Q-values became non-finite; the last finite state was checkpointed."""

    exit_code = 3


SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def space_error(exc: BaseException | None) -> OSError | None:
    """The OSError for lack of space or quota (ENOSPC, EDQUOT) behind `exc`, or None.

    Libraries re-raise it as their own error: torch.save's "[enforce fail at inline_container.cc] unexpected pos"
    RuntimeError carries it as its context, so the whole chain is searched. EFBIG (a file-size limit) is not a lack of
    space and is not counted.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
    space = space_error(exc)
    if space is not None:
        return f"{one_line(space)}: free space on that disk (or quota) and run the command again"
    if isinstance(exc, OSError):
        return f"{text}: check the path, its permissions and the free disk space"
    return f"unexpected {type(exc).__name__}: {text} (rerun with `fastdqn --debug ...` for the traceback and report it)"


def format_bytes(n: float) -> str:
    """Decimal units, as GPU memory is usually quoted: 7088000000 -> '7.09 GB'."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if n < 1000:
            return f"{n:.2f} {unit}"
    return f"{n / 1000:.2f} GB"
