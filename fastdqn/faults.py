"""Faults a long run must survive: envs that raise, non-finite training state, and a missing compiler.

`GuardedEnv` turns an exception inside one env into an `EnvFailure` that names the env index, or rebuilds the
env and cuts its episode when `cfg.env_restarts` allows (`EnvRestarts`; async workers that die or hang are
watched by env_workers.py, which restarts them under the same budget). `FiniteGuard` keeps a device copy of the
learner's last state that was verified finite, so a divergence can be rolled back or checkpointed without the NaNs.
`compile_unavailable` says why `torch.compile` cannot run here (no C++ compiler, no Triton), before it is tried, and
`compile_or_eager` falls back to the eager update with a warning (or refuses, with compile_strict).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

from fastdqn import compile_cache
from fastdqn.config import Config
from fastdqn.errors import DeviceError, EnvError
from fastdqn.logs import console


class EnvFailure(EnvError):
    """An env raised inside `step` or `reset`; the message names the env index and the original error."""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EnvRestarts:
    """One env's restart budget (cfg.env_restarts a run) and the seeds of the envs that replace a failed one.

    Plain data: the copy inside an async worker (`GuardedEnv`) and the trainer's own (`WatchedAsyncVectorEnv`,
    which starts a dead worker again) count the same restarts and draw the same seeds.
    """

    def __init__(self, index: int, cfg: Config):
        self.index, self.env_id, self.allowed, self.used = index, cfg.env_id, cfg.env_restarts, 0
        self.first_seed = cfg.seed + 7919 * (index + 1)

    @property
    def left(self) -> int:
        return self.allowed - self.used

    def take(self) -> int:
        """Use one restart; returns the seed of the env that replaces the failed one."""
        self.used += 1
        return self.first_seed + self.used

    def failure(self, what: str) -> EnvFailure:
        """The error for a failure (`what` happened) that is not restarted: the env index and the fix."""
        if self.allowed == 0:
            hint = "fix the env, or set env_restarts > 0 to rebuild crashed envs"
        else:
            hint = f"fix the env (all env_restarts={self.allowed} were used)"
        return EnvFailure(f"env {self.index} ({self.env_id}) {what}: {hint}")

    def warn(self, what: str, done: str) -> None:
        console.print(
            f"[yellow]warning: env {self.index} ({self.env_id}) {what}; {done} and cut its episode "
            f"({self.left} of env_restarts left)[/]"
        )


def cut_episode(last_obs: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
    """The step result of an env restarted in that step: a truncation back to its last observation with reward 0,
    so the vector env's autoreset starts a new episode (one such transition per restart)."""
    return last_obs, 0.0, False, True, {"env_restarted": True}


class GuardedEnv(gym.Wrapper):
    """Reports an exception in the wrapped env with its index, or rebuilds the env while `restarts` allows.

    After a rebuild the failed step is returned as `cut_episode`.
    """

    def __init__(self, make: Callable[[], gym.Env], restarts: EnvRestarts):
        try:
            env = make()
        except gym.error.Error:
            raise  # gymnasium's own message (unknown id, missing dependency) is already the clearest
        except Exception as exc:
            raise EnvFailure(
                f"env {restarts.index} ({restarts.env_id}) raised {_describe(exc)} while being "
                "created: fix the env or its arguments"
            ) from exc
        super().__init__(env)
        self.make, self.restarts = make, restarts
        self.last_obs: Any = None

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        try:
            obs, info = self.env.reset(**kwargs)
        except Exception as exc:
            raise self.restarts.failure(f"raised {_describe(exc)} in reset") from exc
        self.last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as exc:
            if self.restarts.left <= 0 or self.last_obs is None:
                raise self.restarts.failure(f"raised {_describe(exc)} in step") from exc
            self._rebuild(self.restarts.take())
            self.restarts.warn(f"raised {_describe(exc)} in step", "rebuilt it")
            return cut_episode(self.last_obs)
        self.last_obs = obs
        return obs, reward, terminated, truncated, info

    def _rebuild(self, seed: int) -> None:
        """Replace the crashed env by a fresh one reset with `seed`."""
        try:
            self.env.close()
        except Exception:  # the crashed env may not close cleanly; it is dropped either way
            pass
        self.env = self.make()
        self.env.reset(seed=seed)


def guarded(make: Callable[[], gym.Env], restarts: EnvRestarts) -> Callable[[], gym.Env]:
    """Factory of `make`'s env inside a `GuardedEnv` (what the vector env calls, also in a subprocess)."""
    return lambda: GuardedEnv(make, restarts)


class FiniteGuard:
    """The learner's last state seen finite, kept as a device copy, to roll back to after a divergence."""

    def __init__(self, learner: Any):
        self.learner = learner
        self.snapshot: dict = {}
        self.step = 0  # env step of the snapshot
        self.commit(0)

    def is_finite(self, metrics: dict[str, float]) -> bool:
        """Are the given metrics (loss, Q), every weight and every optimizer moment finite? One host sync."""
        if not all(math.isfinite(v) for v in metrics.values()):
            return False
        tensors = [
            t
            for t in tree_leaves(self.learner.state_dict())
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
        ]
        norms = [norm.to(self.learner.device) for norm in torch._foreach_norm(tensors)]  # e.g. Adam's step on CPU
        return bool(torch.isfinite(torch.stack(norms)).all())

    def commit(self, step: int) -> None:
        """Remember the learner's state: a copy of each tensor's own elements (a deep copy of a population agent's
        tensors, slices of all agents' stacked ones, would copy every agent's)."""
        self.snapshot = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, self.learner.state_dict())
        self.step = step

    def rollback(self) -> None:
        """Copy the snapshot back into the learner's own tensors, in place, so compiled or graph-captured steps
        that hold those tensors keep working."""
        live = self.learner.state_dict()
        if tree_structure(live) != tree_structure(self.snapshot):  # e.g. no optimizer state yet at the snapshot
            self.learner.load_state_dict(copy.deepcopy(self.snapshot))
            return
        with torch.no_grad():
            for dst, src in zip(tree_leaves(live), tree_leaves(self.snapshot)):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)


def divergence_message(cfg: Config, metrics: dict[str, float], since: int, step: int) -> str:
    """What went non-finite, between which steps, and the likely cause with the fix."""
    seen = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not math.isfinite(v)) or "network weights"
    causes = [f"a learning rate too high for this problem (learning_rate={cfg.learning_rate:g}: try 3-10x lower)"]
    if not cfg.clip_rewards:
        causes.append("large or non-finite rewards (check the env's reward scale, or use clip_rewards)")
    if cfg.max_grad_norm == 0:
        causes.append("unclipped gradients (set max_grad_norm, e.g. 10)")
    return f"training diverged: {seen} became non-finite between env steps {since} and {step}; likely " + " or ".join(
        causes
    )


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here, or None if its compiler toolchain is present."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python/platform"
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "Triton, which torch.compile needs on CUDA, is not installed"
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:
        return f"torch.compile has no working compiler here ({_describe(exc)})"
    return None


def compile_or_eager(cfg: Config, device: torch.device) -> Config:
    """The learner's config: `compile` turned off, with a warning, where torch.compile cannot run here.
    Its caches are set up first (compile_cache.py), before anything of torch's reads where they are."""
    if not cfg.compile:
        return cfg
    compile_cache.prepare(device)
    reason = compile_unavailable(device)
    if reason is None:
        return cfg
    if cfg.compile_strict:
        raise DeviceError(f"{reason}: install it, or drop compile_strict to fall back to eager with a warning")
    console.print(
        f"[yellow]warning: {reason}; running the update step eagerly (set compile_strict to make this an error)[/]"
    )
    return cfg.updated(compile=False)
