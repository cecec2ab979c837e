"""Faults a long run must survive: envs that raise, non-finite training state, and a missing compiler.

`GuardedEnv` turns an exception inside one env into an `EnvFailure` that names the env index, or rebuilds the
env and cuts its episode when `cfg.env_restarts` allows. `FiniteGuard` keeps a device copy of the learner's last
state that was verified finite, so a divergence can be rolled back or checkpointed without the NaNs.
`compile_unavailable` says why `torch.compile` cannot run here (no C++ compiler, no Triton), before it is tried, and
`compile_or_eager` falls back to the eager update with a warning (or refuses, with compile_strict).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import gymnasium as gym
import torch
from torch.utils._pytree import tree_leaves, tree_structure

from fastdqn.config import Config
from fastdqn.errors import DeviceError, EnvError
from fastdqn.logs import console


class EnvFailure(EnvError):
    """An env raised inside `step` or `reset`; the message names the env index and the original error."""


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GuardedEnv(gym.Wrapper):
    """Reports an exception in the wrapped env with its index, or rebuilds the env (`restarts_left` times).

    After a rebuild the failed step is returned as a truncation back to the env's last observation with reward 0,
    so the vector env's autoreset starts a new episode in the new env (one such transition per restart).
    """

    def __init__(self, make: Callable[[], gym.Env], index: int, cfg: Config):
        try:
            env = make()
        except gym.error.Error:
            raise  # gymnasium's own message (unknown id, missing dependency) is already the clearest
        except Exception as exc:
            raise EnvFailure(f"env {index} ({cfg.env_id}) raised {_describe(exc)} while being created: fix the "
                             "env or its arguments") from exc
        super().__init__(env)
        self.make, self.index, self.env_id = make, index, cfg.env_id
        self.restarts_left = self.restarts_allowed = cfg.env_restarts
        self.restart_seed = cfg.seed + 7919 * (index + 1)
        self.last_obs: Any = None

    def _failure(self, where: str, exc: BaseException) -> EnvFailure:
        if self.restarts_allowed == 0:
            hint = "fix the env, or set env_restarts > 0 to rebuild crashed envs"
        else:
            hint = f"fix the env (all env_restarts={self.restarts_allowed} were used)"
        return EnvFailure(f"env {self.index} ({self.env_id}) raised {_describe(exc)} in {where}: {hint}")

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        try:
            obs, info = self.env.reset(**kwargs)
        except Exception as exc:
            raise self._failure("reset", exc) from exc
        self.last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as exc:
            if self.restarts_left <= 0 or self.last_obs is None:
                raise self._failure("step", exc) from exc
            self._rebuild()
            console.print(f"[yellow]warning: env {self.index} ({self.env_id}) raised {_describe(exc)} in step; "
                          f"rebuilt it and cut its episode ({self.restarts_left} of env_restarts left)[/]")
            return self.last_obs, 0.0, False, True, {"env_restarted": True}
        self.last_obs = obs
        return obs, reward, terminated, truncated, info

    def _rebuild(self) -> None:
        """Replace the crashed env by a fresh, deterministically seeded one."""
        self.restarts_left -= 1
        try:
            self.env.close()
        except Exception:  # the crashed env may not close cleanly; it is dropped either way
            pass
        self.env = self.make()
        self.restart_seed += 1
        self.env.reset(seed=self.restart_seed)


def guarded(make: Callable[[], gym.Env], index: int, cfg: Config) -> Callable[[], gym.Env]:
    """Factory of `make`'s env inside a `GuardedEnv` (what the vector env calls, also in a subprocess)."""
    return lambda: GuardedEnv(make, index, cfg)


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
        tensors = [t for t in tree_leaves(self.learner.state_dict())
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        norms = [norm.to(self.learner.device) for norm in torch._foreach_norm(tensors)]  # e.g. Adam's step on CPU
        return bool(torch.isfinite(torch.stack(norms)).all())

    def commit(self, step: int) -> None:
        self.snapshot, self.step = copy.deepcopy(self.learner.state_dict()), step

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
    return f"training diverged: {seen} became non-finite between env steps {since} and {step}; likely " + \
        " or ".join(causes)


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
    """The learner's config: `compile` turned off, with a warning, where torch.compile cannot run here."""
    reason = compile_unavailable(device) if cfg.compile else None
    if reason is None:
        return cfg
    if cfg.compile_strict:
        raise DeviceError(f"{reason}: install it, or drop compile_strict to fall back to eager with a warning")
    console.print(f"[yellow]warning: {reason}; running the update step eagerly "
                  "(set compile_strict to make this an error)[/]")
    return cfg.updated(compile=False)
