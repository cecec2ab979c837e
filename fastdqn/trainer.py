"""The DQN training loop, top to bottom.

    for each vector step (N env steps):
        collect: act epsilon-greedily on the device, step the envs, store one transition per env (collection.py)
        run the gradient updates that are due (replay ratio = gradient_steps / train_every per env step)
        copy the target net when a target_update_interval boundary is crossed
        every log_every / eval_every / checkpoint_every env steps: read device counters, evaluate, save

Every counter is in env steps, so changing `num_envs` changes how the work is batched, not what it means.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdqn.checkpoint import check_resume_config, load_checkpoint, save_checkpoint, strip_compile_prefix
from fastdqn.collection import Collector
from fastdqn.config import Config
from fastdqn.counters import Counters
from fastdqn.devices import resolve_device, use_device
from fastdqn.envs import make_vector_env, resolve_vector_mode
from fastdqn.errors import CheckpointError, ConfigError, DeviceError, TrainingDiverged
from fastdqn.evaluation import evaluate
from fastdqn.learner import DQNLearner
from fastdqn.faults import EnvFailure, FiniteGuard, compile_unavailable, divergence_message
from fastdqn.logs import RunLogger, console, summary_table
from fastdqn.frame_replay import FrameReplay
from fastdqn.memory import check_replay_fits
from fastdqn.networks import is_pixel_shape
from fastdqn.prioritized import PrioritizedReplayBuffer
from fastdqn.profiling import profiled
from fastdqn.replay import ReplayBuffer
from fastdqn.schedules import epsilon_at, learning_rate_at, per_beta_at
from fastdqn.update_runner import make_update_runner

CHECKPOINT_FORMAT = 1


def make_replay(cfg: Config, obs_shape: tuple[int, ...], obs_dtype: torch.dtype, device: torch.device) -> ReplayBuffer:
    """The uniform or prioritized buffer the config asks for (n-step aware when n_step > 1).

    Frame stacks (pixel envs) go to `FrameReplay`, which stores each frame once.
    """
    if is_pixel_shape(obs_shape):
        if cfg.prioritized or cfg.n_step > 1 or not cfg.replay_buffer:
            raise ConfigError("pixel envs use the frame replay, which does not support prioritized, n_step > 1 or "
                              "replay_buffer: false yet: turn those off for this env")
        return FrameReplay(cfg.buffer_size, cfg.num_envs, obs_shape[1:], obs_shape[0], device)
    if cfg.prioritized:
        return PrioritizedReplayBuffer(cfg.buffer_size, cfg.num_envs, obs_shape, obs_dtype, device, cfg.n_step,
                                       cfg.gamma, cfg.per_alpha, cfg.per_eps)
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
    steps_to_solve: int | None  # first evaluation step whose mean reached cfg.solved_return
    interrupted: bool = False
    evals: list[tuple[int, float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The one-line JSON result of `fastdqn train --quiet` (and of each run of an experiment)."""
        return {"run_dir": str(self.run_dir), "env_steps": self.env_steps, "final_eval_mean": self.final_eval_mean,
                "steps_to_solve": self.steps_to_solve, "wall_time": round(self.wall_time, 2),
                "interrupted": self.interrupted}


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
    """Builds envs, replay and learner from a Config and runs the loop; can save and restore itself."""

    def __init__(self, cfg: Config, run_dir: Path, show_progress: bool = True):
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), show_progress
        self.device = resolve_device(cfg.device)
        use_device(self.device, cfg.tf32)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.envs = make_vector_env(cfg, cfg.num_envs, mode=resolve_vector_mode(cfg))
        obs_space = self.envs.single_observation_space
        self.obs_shape = tuple(obs_space.shape)
        self.n_actions = int(self.envs.single_action_space.n)
        obs_dtype = torch.uint8 if obs_space.dtype == np.uint8 else torch.float32
        # Size the buffer on the meta device first: refuse, with the numbers, one that does not fit.
        meta = make_replay(cfg, self.obs_shape, obs_dtype, torch.device("meta"))
        self.replay_report = check_replay_fits(meta.nbytes, meta.capacity, self.device)
        self.replay = make_replay(cfg, self.obs_shape, obs_dtype, self.device)
        self.learner = DQNLearner(self.compile_or_eager(cfg), self.obs_shape, self.n_actions, self.device)
        self.updates = make_update_runner(self.learner, self.replay)  # eager, compiled or CUDA-graphed
        self.finite = FiniteGuard(self.learner)
        self.counters = Counters()
        self.collector = Collector(cfg, self.envs, self.replay, self.learner, self.counters, self.device)
        self.evals: list[tuple[int, float, float]] = []
        self.min_replay = min(max(cfg.learning_starts, 1), cfg.buffer_size)

    # --- updates ---------------------------------------------------------------------------------------
    def train(self) -> None:
        """Run the gradient updates that are due, then any target sync that is due."""
        cfg, c = self.cfg, self.counters
        due = max(0, c.env_step - cfg.learning_starts) // cfg.train_every * cfg.gradient_steps
        if len(self.replay) < self.min_replay:
            c.updates = due  # refilling after a resume without saved replay: skip, do not pile up updates
        if due > c.updates:
            self.learner.set_learning_rate(learning_rate_at(cfg, c.env_step))
            if cfg.prioritized:
                self.replay.beta = per_beta_at(cfg, c.env_step)
            self.updates.run(due - c.updates)  # each on a new sample; prioritized replay gets new priorities
            c.updates = due
        syncs_due = c.env_step // cfg.target_update_interval
        if cfg.target_update == "hard" and syncs_due > c.target_syncs:
            self.learner.sync_target()
        c.target_syncs = syncs_due

    # --- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, c = self.cfg, self.counters
        self.logger = RunLogger(self.run_dir, cfg, c.env_step, self.show_progress)
        self.logger.message(self.replay_report)
        start_time, start_step = time.perf_counter(), c.env_step
        interrupted = False
        try:
            with StopRequest() as stop, profiled(self):
                while c.env_step < cfg.total_steps:
                    before = c.env_step
                    for ret, length in self.collector.collect():
                        self.logger.scalars({"charts/episodic_return": ret, "charts/episodic_length": length},
                                            c.env_step)
                    self.train()
                    sps = (c.env_step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                    if crossed(before, c.env_step, cfg.log_every) or c.env_step >= cfg.total_steps:
                        self.log(sps)
                    if crossed(before, c.env_step, cfg.eval_every) and c.env_step < cfg.total_steps:
                        self.evaluate()
                    if crossed(before, c.env_step, cfg.checkpoint_every) and c.env_step < cfg.total_steps:
                        self.save()
                    if stop.requested:
                        interrupted = True
                        break
            wall = time.perf_counter() - start_time
            if interrupted:
                self.save()
                self.logger.message(f"[yellow]stopped at env step {c.env_step}; checkpoint saved. "
                                    f"Resume with: fastdqn train --resume {self.run_dir}[/]")
                final_mean, final_std = (self.evals[-1][1], self.evals[-1][2]) if self.evals else (float("nan"),) * 2
            else:
                final_mean, final_std = self.evaluate()
                self.save()
                self.logger.hparams(final_mean)
        except EnvFailure as exc:
            path = self.save()
            raise EnvFailure(f"{exc}; checkpoint {path.name} saved at env step {c.env_step}, resume with: "
                             f"fastdqn train --resume {self.run_dir}") from exc
        finally:
            self.logger.close()
            self.envs.close()
        steps_to_solve = next((s for s, m, _ in self.evals if m >= cfg.solved_return), None)
        result = TrainResult(self.run_dir, c.env_step, c.updates, c.episodes, wall,
                             (c.env_step - start_step) / max(wall, 1e-9), final_mean, final_std, steps_to_solve,
                             interrupted, list(self.evals))
        if self.show_progress and not interrupted:
            self.print_summary(result)
        return result

    def close(self) -> None:
        """Close the envs (idempotent: `run` closes them too)."""
        self.envs.close()

    def log(self, sps: float) -> None:
        """Read the device counters (the loop's only sync) and write them out."""
        cfg, step = self.cfg, self.counters.env_step
        metrics = self.updates.read_metrics()
        self.check_finite(metrics)
        epsilon = epsilon_at(cfg, step)
        scalars = {"charts/epsilon": epsilon, "charts/learning_rate": learning_rate_at(cfg, step), "charts/SPS": sps}
        scalars.update({f"losses/{k}": v for k, v in metrics.items()})
        self.logger.scalars(scalars, step)
        recent = self.collector.recent_return()
        self.logger.record("train", step, sps=sps, epsilon=epsilon, recent_return=recent,
                           episodes=self.counters.episodes, **metrics)
        self.logger.advance(step, sps, recent, epsilon)

    def evaluate(self) -> tuple[float, float]:
        cfg, step = self.cfg, self.counters.env_step
        returns = evaluate(lambda o: self.learner.act(o, cfg.eval_epsilon), cfg, cfg.eval_episodes, cfg.seed,
                           self.device)
        mean, std = float(returns.mean()), float(returns.std())
        self.evals.append((step, mean, std))
        self.logger.scalars({"eval/mean_return": mean, "eval/std_return": std}, step)
        self.logger.record("eval", step, mean=mean, std=std, returns=returns.tolist(), episodes=self.counters.episodes)
        self.logger.message(f"eval @ {step:>8} env steps: {mean:8.2f} +- {std:.2f} over {cfg.eval_episodes} episodes")
        return mean, std

    def print_summary(self, r: TrainResult) -> None:
        rows = {"env steps": r.env_steps, "gradient updates": r.updates, "episodes": r.episodes,
                "wall time (s)": round(r.wall_time, 1), "env steps / s": round(r.sps),
                "final eval mean": r.final_eval_mean, "final eval std": r.final_eval_std,
                f"steps to eval >= {self.cfg.solved_return:g}": r.steps_to_solve or "not reached",
                "run dir": str(r.run_dir)}
        self.logger.message(summary_table(f"fastdqn: {self.cfg.env_id}", rows))

    # --- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "counters": vars(self.counters).copy(),
            "learner": strip_compile_prefix(self.learner.state_dict()),
            "rng": rng,
            **self.collector.state_dict(),
            "evals": [list(e) for e in self.evals],
        }
        if cfg.save_replay:
            state["replay"] = self.replay.state_dict()
        return state

    def save(self) -> Path:
        """Checkpoint the whole run; never with non-finite weights (`check_finite` rolls those back first)."""
        self.check_finite({})
        return self.write_checkpoint()

    def write_checkpoint(self) -> Path:
        return save_checkpoint(self.state_dict(), self.run_dir, self.counters.env_step, self.cfg.keep_checkpoints)

    def check_finite(self, metrics: dict[str, float]) -> None:
        """At a sync point: remember the learner state if it is finite; otherwise roll back to the last finite
        one and go on (up to cfg.nonfinite_skips times) or checkpoint it and raise TrainingDiverged."""
        c, guard = self.counters, self.finite
        if guard.is_finite(metrics):
            guard.commit(c.env_step)
            return
        guard.rollback()
        message = divergence_message(self.cfg, metrics, guard.step, c.env_step)
        if c.nonfinite_skips < self.cfg.nonfinite_skips:
            c.nonfinite_skips += 1
            (self.logger.message if hasattr(self, "logger") else console.print)(
                f"[yellow]{message}; rolled back to the weights of env step {guard.step} and going on "
                f"({c.nonfinite_skips} of nonfinite_skips={self.cfg.nonfinite_skips})[/]")
            return
        path = self.write_checkpoint()
        raise TrainingDiverged(f"{message}. Saved the last finite weights (env step {guard.step}) as {path}: resume "
                               f"with `fastdqn train --resume {self.run_dir} --learning-rate <lower>`, or set "
                               "nonfinite_skips to roll back and go on")

    def compile_or_eager(self, cfg: Config) -> Config:
        """The learner's config: `compile` turned off, with a warning, where torch.compile cannot run here."""
        reason = compile_unavailable(self.device) if cfg.compile else None
        if reason is None:
            return cfg
        if cfg.compile_strict:
            raise DeviceError(f"{reason}: install it, or drop compile_strict to fall back to eager with a warning")
        console.print(f"[yellow]warning: {reason}; running the update step eagerly "
                      "(set compile_strict to make this an error)[/]")
        return cfg.updated(compile=False)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by `state_dict` with a compatible config."""
        check_resume_config(state["config"], self.cfg)
        try:
            self.learner.load_state_dict(strip_compile_prefix(state["learner"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint does not match this network ({str(exc).splitlines()[0][:100]}): "
                                  "resume with the run's own config") from None
        self.counters.load(state["counters"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.collector.load_state_dict(state)
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self.evals = [tuple(e) for e in state["evals"]]
        self.finite.commit(self.counters.env_step)


def load_run_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {state.get('format')}, this fastdqn reads "
                              f"{CHECKPOINT_FORMAT}: evaluate it with the fastdqn version that wrote it")
    return state
