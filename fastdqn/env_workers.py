"""Async env workers that are watched: a worker process that dies (killed, a segfault, the OOM killer) or hangs is
noticed at once instead of being waited on for ever.

gymnasium's AsyncVectorEnv reads each worker's pipe with a blocking `recv`, so a worker killed mid-step leaves the
trainer blocked. `WatchedAsyncVectorEnv` waits on the pipes and on the worker processes together, with a deadline
of `env_step_timeout` seconds. A worker that died, or did not answer in time (it is killed then), is started again
when `env_restarts` allows (envs with SAME_STEP autoreset: a fresh seeded episode, the step cut like that of an env
that raised, `faults.cut_episode`), or is reported as an `EnvFailure` naming the env index and how it died; the
surviving workers then close normally, without tracebacks.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import gymnasium as gym
import numpy as np
from gymnasium.vector.async_vector_env import AsyncState, _async_worker
from gymnasium.vector.utils import CloudpickleWrapper
from gymnasium.vector.vector_env import AutoresetMode

from fastdqn.config import Config
from fastdqn.faults import EnvFailure, EnvRestarts, cut_episode

CHECK_EVERY = 1.0  # seconds between checks that a worker which has not answered yet is alive
SIGNAL_CAUSES = {
    signal.SIGKILL: "as the kernel's OOM killer does: check `dmesg`",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGABRT: "an abort in native code",
}


def quiet_worker(*args: Any) -> None:
    """gymnasium's worker loop, with the trainer in charge of stopping: Ctrl-C (which the terminal sends to the
    whole process group) is the trainer's to handle, SIGTERM ends the worker at once, and a trainer that has gone
    (its pipe closed) ends it without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker would inherit the trainer's stop handler
    try:
        _async_worker(*args)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass


def how_it_died(process: multiprocessing.Process) -> str:
    """`process` (which has ended) as words: the signal that killed it, or its exit status."""
    process.join(timeout=5)
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"was killed by signal {-code}"
        cause = SIGNAL_CAUSES.get(sig)
        return f"was killed by {sig.name}" + (f" ({cause})" if cause else "")
    return f"exited with status {code}"


class _Pipe:
    """A worker's pipe on which a send to a dead worker is dropped: the death is noticed, and named, where the
    answer is awaited."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def send(self, obj: Any) -> None:
        try:
            self.conn.send(obj)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


class WatchedAsyncVectorEnv(gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv whose `reset` and `step` notice a worker that died or hangs (see the module doc).

    `restarts` (one `EnvRestarts` per env, shared with the `GuardedEnv` factories in `env_fns`) lets a dead worker
    be started again; None (NEXT_STEP pixel envs, whose episode bookkeeping a cut step would break) reports it.
    """

    parent_pipes: list[Any]  # each worker's pipe wrapped in _Pipe, or None once its worker died

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        cfg: Config,
        restarts: list[EnvRestarts] | None = None,
        **kwargs: Any,
    ):
        super().__init__(env_fns, worker=quiet_worker, **kwargs)
        self.parent_pipes = [_Pipe(pipe) for pipe in self.parent_pipes]
        self.env_id, self.step_timeout, self.restarts = cfg.env_id, cfg.env_step_timeout, restarts
        self.last_obs: np.ndarray | None = None  # each env's observation before the pending step
        if restarts is not None and self.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError("restarting a worker cuts its episode the SAME_STEP way: pass restarts=None")

    # --- the two calls a run makes (their deadline is env_step_timeout, not `timeout`) --------------------
    def reset_wait(self, timeout: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        answers = self._gather(AsyncState.WAITING_RESET, "reset")
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            obs, info = answers[i]
            self._take_obs(i, obs)
            infos = self._add_info(infos, info, i)
        return self._observations(), infos

    def step_wait(
        self, timeout: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        answers = self._gather(AsyncState.WAITING_STEP, "step")
        rewards, terminated, truncated = (
            np.zeros(self.num_envs),
            np.zeros(self.num_envs, dtype=np.bool_),
            np.zeros(self.num_envs, dtype=np.bool_),
        )
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            obs, rewards[i], terminated[i], truncated[i], info = answers[i]
            self._take_obs(i, obs)
            infos = self._add_info(infos, info, i)
        return self._observations(), rewards, terminated, truncated, infos

    # --- waiting on the workers ------------------------------------------------------------------------
    def _gather(self, state: AsyncState, call: str) -> dict[int, Any]:
        """Every env's answer to the pending `call`; a dead or hung worker is started again (a step, with restarts
        left: its answer is the cut step) or raises EnvFailure; an env that raised raises as in gymnasium."""
        self._assert_is_running()
        if self._state != state:
            raise gym.error.NoAsyncCallError(f"calling `{call}_wait` without a pending `{call}_async`", state.value)
        answers, deaths = self._await(range(self.num_envs))
        self._state = AsyncState.DEFAULT
        self._raise_if_errors([answers[i][1] if i in answers else True for i in range(self.num_envs)])
        results = {i: result for i, (result, _) in answers.items()}
        if call == "step" and self.restarts is not None:
            for i, (*_, info) in results.items():
                if info.get("final_info", {}).get("env_restarted"):
                    self.restarts[i].take()  # the worker's GuardedEnv rebuilt its env: count it here too
        for i, death in sorted(deaths.items()):
            results[i] = self._restart(i, death) if self._can_restart(i, call) else self._raise_death(i, death, call)
        return results

    def _await(self, indices: Iterable[int]) -> tuple[dict[int, Any], dict[int, str]]:
        """(answers, deaths): what each worker in `indices` sent, or how it died or hung, within step_timeout."""
        answers, deaths = {}, {}
        deadline = time.monotonic() + self.step_timeout
        for i in indices:
            answered, answer = self._answer(i, deadline)
            if answered:
                answers[i] = answer
            else:
                deaths[i] = answer
                self.parent_pipes[i].close()
                self.processes[i].join()
        return answers, deaths

    def _answer(self, i: int, deadline: float) -> tuple[bool, Any]:
        """(True, worker i's answer), or (False, how it died); as cheap as gymnasium's blocking read while it works.

        A dead worker's pipe reads as closed at once; the process is also checked every CHECK_EVERY seconds, for a
        worker whose pipe end another process (a child of the env) still holds.
        """
        pipe, process = self.parent_pipes[i].conn, self.processes[i]
        while True:
            remaining = deadline - time.monotonic()
            ready = pipe.poll(max(0.0, min(CHECK_EVERY, remaining)))
            if not ready and not process.is_alive():
                ready = pipe.poll(0)  # it may have answered just before it ended
                if not ready:
                    return False, how_it_died(process)
            if ready:
                try:
                    return True, pipe.recv()
                except (EOFError, OSError):
                    return False, how_it_died(process)
            if remaining <= 0:
                process.kill()
                return False, f"hung (no answer within env_step_timeout={self.step_timeout:g} s) and was killed"

    # --- a dead worker ---------------------------------------------------------------------------------
    def _can_restart(self, i: int, call: str) -> bool:
        return call == "step" and self.restarts is not None and self.restarts[i].left > 0 and self.last_obs is not None

    def _raise_death(self, i: int, death: str, call: str) -> NoReturn:
        self.parent_pipes[i] = None  # gymnasium's close skips it; the survivors close normally
        what = f"worker process {death} in {call}"
        if self.restarts is None:
            raise EnvFailure(
                f"env {i} ({self.env_id}) {what}: pixel envs are not restarted; fix the env or what "
                "killed it, then resume"
            )
        raise self.restarts[i].failure(what)

    def _restart(self, i: int, death: str) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Start env i's worker again on a fresh, seeded episode; the step it died in, cut."""
        assert self.restarts is not None and self.last_obs is not None, "_can_restart(i) said it may restart"
        seed = self.restarts[i].take()
        ctx = multiprocessing.get_context(self.context)
        parent, child = ctx.Pipe()
        # Observations come back through the pipe (no shared-memory handle to give a new worker); _take_obs
        # copies them into the shared array the other workers write to.
        # Every concrete context has Process; typeshed's BaseContext, which get_context returns, lacks it.
        process = ctx.Process(  # type: ignore[attr-defined]
            target=quiet_worker,
            name=f"Worker<{type(self).__name__}>-{i}",
            daemon=self.daemon,
            args=(
                i,
                CloudpickleWrapper(self.env_fns[i]),
                child,
                parent,
                None,
                self.error_queue,
                self.autoreset_mode,
                None,
            ),
        )
        process.start()
        child.close()
        self.parent_pipes[i], self.processes[i] = _Pipe(parent), process
        self.parent_pipes[i].send(("reset", {"seed": seed, "options": None}))
        answers, deaths = self._await([i])
        if deaths:
            self._raise_death(i, f"{death}; its new worker {deaths[i]}", "step")
        (obs, info), ok = answers[i]
        self._raise_if_errors([ok if j == i else True for j in range(self.num_envs)])
        self.restarts[i].warn(f"worker process {death} in step", "started a new worker")
        last, reward, terminated, truncated, step_info = cut_episode(self.last_obs[i])
        return obs, reward, terminated, truncated, {"final_obs": last, "final_info": step_info, **info}

    # --- observations ----------------------------------------------------------------------------------
    def _take_obs(self, i: int, obs: Any) -> None:
        """A worker that sent its observation (no shared memory) has it copied into the batch."""
        if obs is not None:
            self.observations[i] = obs

    def _observations(self) -> np.ndarray:
        batch = deepcopy(self.observations) if self.copy else self.observations
        self.last_obs = batch if self.copy else np.array(batch, copy=True)
        return batch
