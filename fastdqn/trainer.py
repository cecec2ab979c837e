"""The DQN training loop, top to bottom.

    for each vector step (N env steps):
        start: act epsilon-greedily on the device, start the envs' step
        train: run the gradient updates that are due (replay ratio = gradient_steps / train_every per env step),
               then copy the target net when a target_update_interval boundary is crossed
        finish: collect the envs' step, store one transition per env
        every log_every / eval_every / checkpoint_every env steps: read device counters, evaluate, save

With `overlap` (stepping.py) the envs step while the updates run, and the updates of a vector step sample the
replay without that step's transitions (one vector step of data delay; every count and schedule is the same).
Without it (and until the replay holds learning_starts transitions) the step is collected before its updates.

Every counter is in env steps, so changing `num_envs` changes how the work is batched, not what it means. The
Trainer builds the loop's units from the Config, and each can be built and used alone: the collector
(collection.py), the learner and its update runner (learner.py, update_runner.py), the evaluator (evaluation.py)
and the checkpointer with the finite guard (checkpointer.py). The logger (logs.py) lives for one call of `run`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from fastdqn import spaces
from fastdqn.checkpointer import Checkpointer
from fastdqn.collection import Collector
from fastdqn.config import Config
from fastdqn.counters import Counters
from fastdqn.devices import resolve_device, use_device
from fastdqn.envs import make_vector_env, obs_dtype, resolve_vector_mode
from fastdqn.errors import ConfigError
from fastdqn.evaluation import Evaluator
from fastdqn.faults import EnvFailure, compile_or_eager
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner
from fastdqn.logs import RunLogger, ScalarSink, console, summary_table
from fastdqn.memory import check_replay_fits
from fastdqn.networks import is_pixel_shape
from fastdqn.prioritized import PrioritizedReplayBuffer
from fastdqn.process_clock import seconds_since_start
from fastdqn.profiling import profiled
from fastdqn.replay import Replay, ReplayBuffer
from fastdqn.schedules import epsilon_at, learning_rate_at, per_beta_at
from fastdqn.stepping import overlap_wanted
from fastdqn.update_runner import make_update_runner


def make_replay(cfg: Config, obs_shape: tuple[int, ...], obs_dtype: torch.dtype, device: torch.device) -> Replay:
    """The uniform or prioritized buffer the config asks for (n-step aware when n_step > 1).

    Frame stacks (pixel envs) go to `FrameReplay`, which stores each frame once.
    """
    if is_pixel_shape(obs_shape):
        if cfg.prioritized or cfg.n_step > 1 or not cfg.replay_buffer:
            raise ConfigError(
                "pixel envs use the frame replay, which does not support prioritized, n_step > 1 or "
                "replay_buffer: false yet: turn those off for this env"
            )
        return FrameReplay(cfg.buffer_size, cfg.num_envs, obs_shape[1:], obs_shape[0], device)
    if cfg.prioritized:
        return PrioritizedReplayBuffer(
            cfg.buffer_size,
            cfg.num_envs,
            obs_shape,
            obs_dtype,
            device,
            cfg.n_step,
            cfg.gamma,
            cfg.per_alpha,
            cfg.per_eps,
        )
    return ReplayBuffer(cfg.buffer_size, cfg.num_envs, obs_shape, obs_dtype, device, cfg.n_step, cfg.gamma)


def crossed(before: int, after: int, every: int) -> bool:
    """Did the count pass a multiple of `every` going from `before` to `after`?"""
    return every > 0 and after // every > before // every


@dataclass
class TrainResult:
    """How a run went: counts, wall time, evaluations (step, mean, std) and the final one."""

    run_dir: Path
    env_steps: int
    updates: int
    episodes: int
    wall_time: float
    sps: float
    final_eval_mean: float
    final_eval_std: float
    steps_to_solve: int | None  # first evaluation step whose mean reached cfg.solve_line (None: never, or no line)
    interrupted: bool = False
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    best_eval: tuple[int, float, float] | None = None  # (env step, mean, std) of the evaluation best.pt holds
    first_update_time: float | None = None  # seconds from process start to the end of this run's first update
    steady_sps: float | None = None  # env steps/s from the end of the first update to the end of training
    stopped_early: bool = False  # on_eval asked the run to stop (e.g. a search pruned it); interrupted too
    # CPU seconds (user + system, every thread of this process; not async env workers) over the same span as
    # wall_time: on a shared machine it compares trainers more fairly than wall time
    cpu_time: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The one-line JSON result of `fastdqn train --quiet` (and of each run of an experiment)."""
        best_step, best_mean = self.best_eval[:2] if self.best_eval else (None, None)
        return {
            "run_dir": str(self.run_dir),
            "env_steps": self.env_steps,
            "final_eval_mean": self.final_eval_mean,
            "best_eval_mean": best_mean,
            "best_eval_step": best_step,
            "steps_to_solve": self.steps_to_solve,
            "wall_time": round(self.wall_time, 2),
            "cpu_time": round(self.cpu_time, 2),
            "first_update_time": self.first_update_time,
            "steady_sps": self.steady_sps,
            "interrupted": self.interrupted,
            "stopped_early": self.stopped_early,
        }

    def table(self, cfg: Config) -> Table:
        """The console summary printed at the end of a run."""
        rows = {
            "env steps": self.env_steps,
            "gradient updates": self.updates,
            "episodes": self.episodes,
            "wall time (s)": round(self.wall_time, 1),
            "env steps / s": round(self.sps),
            "final eval mean": self.final_eval_mean,
            "final eval std": self.final_eval_std,
            "best eval mean (best.pt)": (
                f"{self.best_eval[1]:g} at env step {self.best_eval[0]}" if self.best_eval else "no evaluation"
            ),
        }
        if cfg.solve_line is not None:  # envs without a solve line (Atari, MinAtar) show scores only
            rows[f"steps to eval >= {cfg.solve_line:g}"] = self.steps_to_solve or "not reached"
        return summary_table(f"fastdqn: {cfg.env_id}", {**rows, "run dir": str(self.run_dir)})


@dataclass
class RunState:
    """What one call of `Trainer.run` keeps besides the counters: its logger, clock and the episodes not logged yet
    ((env step, raw return, length), logged at the next sync point)."""

    logger: RunLogger
    start_time: float
    start_step: int
    episodes: list[tuple[int, float, int]] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False  # on_eval asked the run to stop
    finished: bool = False  # end_run completed: the final evaluation and checkpoint (or the stop's) are saved
    end_time: float = 0.0
    start_cpu: float = field(default_factory=time.process_time)  # this process's CPU clock, as start_time
    end_cpu: float = 0.0

    def add_episodes(self, env_step: int, ended: list[tuple[float, int]]) -> None:
        self.episodes += [(env_step, ret, length) for ret, length in ended]


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its current vector step, saves and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds envs, replay, learner, collector, evaluator and checkpointer from a Config and runs the loop."""

    def __init__(self, cfg: Config, run_dir: Path, show_progress: bool = True):
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), show_progress
        self.device = resolve_device(cfg.device)
        use_device(self.device, cfg.tf32)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.envs = make_vector_env(cfg, cfg.num_envs, mode=resolve_vector_mode(cfg))
        obs_space = self.envs.single_observation_space
        self.obs_shape = spaces.obs_shape(obs_space)
        self.n_actions = spaces.n_actions(self.envs.single_action_space)
        dtype = obs_dtype(obs_space)
        # Size the buffer on the meta device first: refuse, with the numbers, one that does not fit.
        meta = make_replay(cfg, self.obs_shape, dtype, torch.device("meta"))
        self.replay_report = check_replay_fits(meta.nbytes, meta.capacity, self.device)
        self.replay = make_replay(cfg, self.obs_shape, dtype, self.device)
        self.learner = DQNLearner(compile_or_eager(cfg, self.device), self.obs_shape, self.n_actions, self.device)
        self.updates = make_update_runner(self.learner, self.replay)  # eager, compiled or CUDA-graphed
        self.counters = Counters()
        self.overlap = overlap_wanted(cfg, self.envs, self.device)
        self.collector = Collector(cfg, self.envs, self.replay, self.learner, self.counters, self.device, self.overlap)
        self.evaluator = Evaluator(cfg, self.learner)
        self.checkpoints = Checkpointer(
            cfg, self.run_dir, self.learner, self.replay, self.collector, self.evaluator, self.counters
        )
        self.min_replay = min(max(cfg.learning_starts, 1), cfg.buffer_size)
        self.first_update: tuple[float, int, float | None] | None = None  # see mark_first_update
        self.label = ""  # put before the run's console messages (a population names its agent)
        self.resume_dir = self.run_dir  # what `fastdqn train --resume` continues (a population's dir for its agents)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (see `checkpointer.load_run_checkpoint`) made with a compatible config."""
        self.checkpoints.restore(state)

    # --- the loop -------------------------------------------------------------------------------------
    def run(self, on_eval: Callable[[int, float], bool] | None = None, sinks: Sequence[ScalarSink] = ()) -> TrainResult:
        """Train to total_steps (or to a SIGINT/SIGTERM), evaluating and checkpointing on the way; then the final
        evaluation and checkpoint. `on_eval(env_step, mean_return)` runs after each periodic evaluation; when it
        returns True the run stops as on SIGINT (checkpoint saved, resumable). `sinks` get every scalar too."""
        run = self.open_run(sinks)
        try:
            with StopRequest() as stop, profiled(self):
                while self.counters.env_step < self.cfg.total_steps and not run.interrupted:
                    before = self.counters.env_step
                    run.add_episodes(self.counters.env_step, self.vector_step())
                    self.after_vector_step(run, before, stop, on_eval)
            self.end_run(run)
        except EnvFailure as exc:
            raise self.env_failure(run, exc) from exc
        finally:
            run.logger.close(quiet=not run.finished)  # a failing run reports its own error, not a second one
            self.close()
        return self.result(run)

    def open_run(self, sinks: Sequence[ScalarSink] = ()) -> RunState:
        """Open the run's logs (console, TensorBoard, metrics.jsonl, `sinks`) and start its clock."""
        logger = RunLogger(self.run_dir, self.cfg, self.counters.env_step, self.show_progress, sinks, self.label)
        logger.message(self.replay_report)
        warning = self.checkpoints.space_warning()
        if warning:
            logger.message(f"[yellow]{warning}[/]")
        return RunState(logger, time.perf_counter(), self.counters.env_step)

    def after_vector_step(
        self, run: RunState, before: int, stop: StopRequest, on_eval: Callable[[int, float], bool] | None = None
    ) -> None:
        """What is due after the vector step that took the count from `before`: logs, an evaluation, a checkpoint;
        marks the run interrupted when a stop was asked for (by a signal, or by `on_eval` returning True)."""
        cfg, c = self.cfg, self.counters
        done = c.env_step >= cfg.total_steps
        log, ckpt = (
            crossed(before, c.env_step, cfg.log_every) or done,
            crossed(before, c.env_step, cfg.checkpoint_every) and not done,
        )
        if log:
            self.log(run.logger, (c.env_step - run.start_step) / max(time.perf_counter() - run.start_time, 1e-9))
        if crossed(before, c.env_step, cfg.eval_every) and not done:
            self.evaluate(run.logger)
            if on_eval is not None and on_eval(c.env_step, self.evaluator.evals[-1][1]):
                stop.requested = run.stopped_early = True
        if run.episodes and (log or ckpt or stop.requested):
            run.logger.episodes(run.episodes)
            run.episodes = []
        if ckpt:
            self.checkpoints.save()
        run.interrupted = stop.requested

    def end_run(self, run: RunState) -> None:
        """Stop the clock; save a stopped run, or evaluate and save a finished one (a stop asked for from here on
        waits for the last checkpoint)."""
        c = self.counters
        run.end_time, run.end_cpu = time.perf_counter(), time.process_time()
        with StopRequest():
            if run.interrupted:
                self.checkpoints.save()
                run.logger.message(
                    f"[yellow]stopped at env step {c.env_step}; checkpoint saved. "
                    f"Resume with: fastdqn train --resume {self.resume_dir}[/]"
                )
            elif not self.evaluator.evals or self.evaluator.evals[-1][0] != c.env_step:
                self.evaluate(run.logger)  # (a finished run resumed again has its final evaluation and checkpoint)
                self.checkpoints.save()
                run.logger.hparams(self.evaluator.evals[-1][1])
        run.finished = True

    def env_failure(self, run: RunState, exc: EnvFailure) -> EnvFailure:
        """Checkpoint after an env failure; the error to raise, saying where the run stopped and how to resume."""
        run.logger.episodes(run.episodes)
        path = self.checkpoints.save()
        return EnvFailure(
            f"{exc}; checkpoint {path.name} saved at env step {self.counters.env_step}, resume with: "
            f"fastdqn train --resume {self.run_dir}"
        )

    def result(self, run: RunState, table: bool = True) -> TrainResult:
        """How the run went, printed as a table unless quiet, stopped or not asked for."""
        c, evals = self.counters, self.evaluator.evals
        wall = run.end_time - run.start_time
        final_mean, final_std = evals[-1][1:] if evals else (float("nan"), float("nan"))
        result = TrainResult(
            self.run_dir,
            c.env_step,
            c.updates,
            c.episodes,
            wall,
            (c.env_step - run.start_step) / max(wall, 1e-9),
            final_mean,
            final_std,
            self.evaluator.steps_to_solve(),
            run.interrupted,
            list(evals),
            self.evaluator.best,
            stopped_early=run.stopped_early,
            cpu_time=run.end_cpu - run.start_cpu,
        )
        if self.first_update is not None:
            first_clock, first_step, result.first_update_time = self.first_update
            result.steady_sps = (c.env_step - first_step) / max(run.end_time - first_clock, 1e-9)
        if table and self.show_progress and not run.interrupted:
            console.print(result.table(self.cfg))
        return result

    def close(self) -> None:
        """Close the envs, after dropping a step still in flight (idempotent: `run` closes them too)."""
        self.collector.close()
        self.envs.close()

    def vector_step(self) -> list[tuple[float, int]]:
        """One vector step and the updates due once it is counted; returns the episodes that ended in it.

        With overlap the updates run while the envs step, on the replay as it is: only once it holds
        learning_starts transitions without this step, so every update the sequential loop runs still runs.
        """
        after = self.counters.env_step + self.cfg.num_envs
        self.collector.start()
        if self.overlap and len(self.replay) >= self.min_replay:
            self.train(after)
            return self.collector.finish()
        finished = self.collector.finish()
        self.train(after)
        return finished

    def train(self, env_step: int | None = None) -> None:
        """Run the gradient updates that are due at `env_step` (default: the env steps counted so far), then any
        target sync that is due."""
        env_step = self.counters.env_step if env_step is None else env_step
        n = self.start_updates(env_step)
        if n and self.first_update is None:  # the run's first update alone, to time it
            self.updates.run(1)
            self.mark_first_update(env_step)
            n -= 1
        if n:
            self.updates.run(n)  # each on a new sample; prioritized replay gets new priorities
        self.sync_targets(env_step)

    def start_updates(self, env_step: int) -> int:
        """How many gradient updates are due at `env_step`, counted as done, with the learning rate (and
        prioritized replay's beta) set for them."""
        cfg, c = self.cfg, self.counters
        due = max(0, env_step - cfg.learning_starts) // cfg.train_every * cfg.gradient_steps
        if len(self.replay) < self.min_replay:
            c.updates = due  # refilling after a resume without saved replay: skip, do not pile up updates
        n = due - c.updates
        if n <= 0:
            return 0
        self.learner.set_learning_rate(learning_rate_at(cfg, env_step))
        if cfg.prioritized:
            assert isinstance(self.replay, PrioritizedReplayBuffer), "make_replay: prioritized"
            self.replay.beta = per_beta_at(cfg, env_step)
        c.updates = due
        return n

    def sync_targets(self, env_step: int) -> None:
        """Copy the online net to the target net when a target_update_interval boundary has been crossed."""
        cfg, c = self.cfg, self.counters
        syncs_due = env_step // cfg.target_update_interval
        if cfg.target_update == "hard" and syncs_due > c.target_syncs:
            self.learner.sync_target()
        c.target_syncs = syncs_due

    def mark_first_update(self, env_step: int) -> None:
        """Remember (clock, env step, seconds since process start) at the end of this run's first update, due at
        `env_step`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once a run: until then the update is only queued
        self.first_update = (time.perf_counter(), env_step, seconds_since_start())

    def log(self, logger: RunLogger, sps: float) -> None:
        """Read the device counters (the loop's only sync), check them for divergence and write them out."""
        cfg, c = self.cfg, self.counters
        metrics = self.updates.read_metrics()
        self.checkpoints.check_finite(metrics)
        logger.training(
            c.env_step,
            sps,
            epsilon_at(cfg, c.env_step),
            learning_rate_at(cfg, c.env_step),
            metrics,
            self.collector.recent_return(),
            c.episodes,
        )

    def evaluate(self, logger: RunLogger) -> None:
        """Evaluate the current policy, keep it as best.pt if it beats every earlier evaluation, and report it."""
        returns = self.evaluator.evaluate(self.counters.env_step)
        if self.evaluator.newest_is_best():
            self.checkpoints.save_best(returns.tolist())
        assert self.evaluator.best is not None, "set by the evaluation just taken"
        logger.evaluation(self.counters.env_step, returns, self.counters.episodes, self.evaluator.best)
