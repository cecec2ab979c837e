"""How the envs' step of a vector step is started and collected, so that the updates can run in between.

The training loop starts the step with the actions (`start`), runs the updates that are due, then collects the
step (`finish`). With the overlap off (`InlineStep`) the envs step inside `finish`, after the updates, as in the
sequential loop. With it on, the envs step while the updates run: ale-py's vector env through `send`/`recv` (its
C++ threads), gymnasium's async vector env through `step_async`/`step_wait` (its worker processes), and sync or
native envs on a CPU in a worker thread (`ThreadStep`; the torch ops of the updates release the GIL). On CUDA
sync and native envs step inline: the updates queued before `finish` run on the GPU while the host steps the envs.
A population's agents' native CartPoles, stepped inline, take one numpy step together (`JointStep`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, cast

import gymnasium as gym
import numpy as np
import torch

from fastdqn.config import Config
from fastdqn.envs import SameStepCartPole, step_together
from fastdqn.errors import ConfigError

Stepped = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]  # what `envs.step` returns


class Stepper(Protocol):
    """Starts a vector step of `envs` and collects it; at most one is in flight."""

    @property
    def envs(self) -> gym.vector.VectorEnv: ...

    def start(self, actions: np.ndarray) -> None: ...

    def finish(self) -> Stepped: ...

    def close(self) -> None:
        """Collect and drop a step still in flight, so the envs can close."""


class InlineStep:
    """The envs step in `finish`, in this thread."""

    def __init__(self, envs: gym.vector.VectorEnv):
        self.envs = envs
        self.actions: np.ndarray | None = None

    def start(self, actions: np.ndarray) -> None:
        self.actions = actions

    def finish(self) -> Stepped:
        actions, self.actions = self.actions, None
        return self.envs.step(actions)

    def close(self) -> None:
        self.actions = None  # nothing was started


class InFlight(ABC):
    """Shared by the steppers whose step runs elsewhere once started: drains it on close."""

    pending = False

    @abstractmethod
    def finish(self) -> Stepped:
        """Wait for the step started last and return what `envs.step` would have."""

    def close(self) -> None:
        if self.pending:
            try:
                self.finish()
            except Exception:  # the run is ending with an error already; the envs close next
                pass


class SendRecvStep(InFlight):
    """ale-py's vector env: `send` hands the actions to its C++ threads, `recv` waits for their step."""

    def __init__(self, envs: Any):  # ale_py.vector_env.AtariVectorEnv, which carries no type information
        self.envs = envs

    def start(self, actions: np.ndarray) -> None:
        self.envs.send(actions)
        self.pending = True

    def finish(self) -> Stepped:
        self.pending = False
        return self.envs.recv()


class AsyncStep(InFlight):
    """gymnasium's async vector env: its worker processes step between `step_async` and `step_wait`."""

    def __init__(self, envs: gym.vector.AsyncVectorEnv):
        self.envs = envs

    def start(self, actions: np.ndarray) -> None:
        self.envs.step_async(actions)
        self.pending = True

    def finish(self) -> Stepped:
        self.pending = False
        return self.envs.step_wait()


class ThreadStep(InFlight):
    """`envs.step` in a worker thread of its own (one step at a time, in order)."""

    def __init__(self, envs: gym.vector.VectorEnv):
        self.envs = envs
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdqn-envs")
        self.future: Future | None = None

    def start(self, actions: np.ndarray) -> None:
        self.future = self.pool.submit(self.envs.step, actions)
        self.pending = True

    def finish(self) -> Stepped:
        future, self.future, self.pending = self.future, None, False
        assert future is not None, "finish() follows start()"
        return future.result()  # an exception in the env (EnvFailure) is raised here

    def close(self) -> None:
        super().close()
        self.pool.shutdown(wait=True)


class CartPoleGroup:
    """A population's agents' CartPole envs, stepped together (`envs.step_together`) when every agent has started its
    step; each agent's `JointStep` takes its share. An agent that finishes a step the others have not started (its
    collector used on its own) steps its envs alone, which gives the same."""

    def __init__(self, envs: Sequence[SameStepCartPole], engine: SameStepCartPole):
        self.envs, self.engine = list(envs), engine
        self.actions: list[np.ndarray | None] = [None] * len(self.envs)
        self.stepped: list[Stepped | None] = [None] * len(self.envs)

    def start(self, k: int, actions: np.ndarray) -> None:
        self.actions[k] = actions

    def finish(self, k: int) -> Stepped:
        stepped = self.stepped[k]
        if stepped is not None:
            self.stepped[k] = None
            return stepped
        mine = self.actions[k]
        assert mine is not None, "finish() follows start()"
        if any(a is None for a in self.actions):  # the others have not started: this agent's envs step alone
            self.actions[k] = None
            return self.envs[k].step(mine)
        actions, self.actions = self.actions, [None] * len(self.envs)
        self.stepped = list(step_together(self.envs, cast(list[np.ndarray], actions), self.engine))
        stepped, self.stepped[k] = self.stepped[k], None
        assert stepped is not None, "step_together returns every env's step"
        return stepped

    def close(self) -> None:
        self.engine.close()


class JointStep:
    """Agent k's stepper in a `CartPoleGroup`: its envs step with every other agent's, in the first `finish`."""

    def __init__(self, group: CartPoleGroup, k: int):
        self.group, self.k = group, k

    @property
    def envs(self) -> gym.vector.VectorEnv:
        return self.group.envs[self.k]

    def start(self, actions: np.ndarray) -> None:
        self.group.start(self.k, actions)

    def finish(self) -> Stepped:
        return self.group.finish(self.k)

    def close(self) -> None:
        self.group.actions[self.k] = None  # a step started and not taken is dropped


def joint_steppers(envs: Sequence[gym.vector.VectorEnv], steppers: Sequence[Stepper]) -> list[JointStep] | None:
    """Steppers that step a population's agents' envs together, where all are native CartPoles stepped inline (no
    overlap); None where they are not."""
    if not all(isinstance(e, SameStepCartPole) for e in envs) or not all(isinstance(s, InlineStep) for s in steppers):
        return None
    group_envs = cast(list[SameStepCartPole], list(envs))
    group = CartPoleGroup(group_envs, group_envs[0].with_envs(sum(e.num_envs for e in group_envs)))
    return [JointStep(group, k) for k in range(len(group_envs))]


def is_ale_vector_env(envs: gym.vector.VectorEnv) -> bool:
    return type(envs).__module__.startswith("ale_py")


def overlap_wanted(cfg: Config, envs: gym.vector.VectorEnv, device: torch.device) -> bool:
    """Whether this run steps its envs while the updates run; overlap=always without a replay is a clear error.

    auto: where the envs step outside this Python thread anyway (ale-py's threads, async processes) or the updates
    run on a GPU; not for sync and native envs on a CPU, whose worker thread would share the interpreter (and its
    lock) with the updates. The no-replay ablation trains on the vector step just taken, so it never overlaps.
    """
    if cfg.overlap == "never":
        return False
    if not cfg.replay_buffer:
        if cfg.overlap == "always":
            raise ConfigError(
                "overlap=always runs a vector step's updates on the replay without that step, but "
                "replay_buffer: false trains on the step just taken: set overlap to auto or never"
            )
        return False
    if cfg.overlap == "always":
        return True
    return device.type == "cuda" or is_ale_vector_env(envs) or isinstance(envs, gym.vector.AsyncVectorEnv)


def make_stepper(envs: gym.vector.VectorEnv, device: torch.device, overlap: bool) -> Stepper:
    """The stepper for `envs`: inline without overlap, else the one that lets the envs step while the updates
    run on `device`."""
    if not overlap:
        return InlineStep(envs)
    if is_ale_vector_env(envs):
        return SendRecvStep(envs)
    if isinstance(envs, gym.vector.AsyncVectorEnv):
        return AsyncStep(envs)
    return InlineStep(envs) if device.type == "cuda" else ThreadStep(envs)
