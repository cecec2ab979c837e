"""A run's checkpoints: what they hold, restoring a run from one, and the guard that keeps them finite.

A checkpoint (its file handling is checkpoint.py) holds the config, the counters, the learner (networks and
optimizer, saved without torch.compile's prefix), torch's RNG states, the collector's state (last observations,
the env state where it is plain data, recent returns), the evaluations and, with save_replay, the replay.
Restoring all of it continues the run exactly as if it had never stopped. `best.pt` is written beside them
whenever an evaluation beats all earlier ones: the config, the online network and that evaluation's returns,
so a run that falls back after its peak still ends with its best policy.

The finite guard runs at the loop's sync points (logging, saving): a finite learner state is remembered; a
non-finite one is rolled back to the last finite state and training goes on (at most cfg.nonfinite_skips times),
or that last finite state is checkpointed and the run stops with TrainingDiverged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdqn.checkpoint import (
    BEST_FILE,
    check_resume_config,
    checkpoint_nbytes,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    strip_compile_prefix,
    write_atomically,
)
from fastdqn.collection import Collector
from fastdqn.config import Config
from fastdqn.counters import Counters
from fastdqn.disk import free_bytes
from fastdqn.errors import CheckpointError, TrainingDiverged, format_bytes
from fastdqn.evaluation import Evaluator
from fastdqn.faults import FiniteGuard, divergence_message
from fastdqn.learner import DQNLearner
from fastdqn.logs import console
from fastdqn.replay import Replay

CHECKPOINT_FORMAT = 1


class Checkpointer:
    """Saves the state of a run's units into `run_dir` and restores them; owns the run's finite guard."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        learner: DQNLearner,
        replay: Replay,
        collector: Collector,
        evaluator: Evaluator,
        counters: Counters,
    ):
        self.cfg, self.run_dir, self.counters = cfg, Path(run_dir), counters
        self.learner, self.replay, self.collector, self.evaluator = learner, replay, collector, evaluator
        self.finite = FiniteGuard(learner)
        self.generator: torch.Generator | None = None  # a population agent's own random draws; None: torch's

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The generator states the run draws from: torch's (and CUDA's), with a population agent's own generator in
        the place of its device's, so the agent's dir also resumes as a run of its own."""
        rng = {"torch": torch.get_rng_state()}
        if self.learner.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.learner.device)
        if self.generator is not None:
            rng[rng_key(self.generator)] = self.generator.get_state()
        return rng

    def set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
        """Restore what `rng_state` saved (into the agent's own generator only, for a population agent)."""
        if self.generator is not None:
            self.generator.set_state(rng[rng_key(self.generator)])
            return
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.learner.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.learner.device)

    def state_dict(self, replay: bool = True) -> dict[str, Any]:
        """The whole run as plain data (tensors, numbers, strings), loadable with weights_only; the replay only with
        save_replay (and `replay`)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "counters": vars(self.counters).copy(),
            "learner": strip_compile_prefix(self.learner.state_dict()),
            "rng": self.rng_state(),
            **self.collector.state_dict(),
            **self.evaluator.state_dict(),
        }
        if self.cfg.save_replay and replay:
            state["replay"] = self.replay.state_dict()
        return state

    def largest_nbytes(self) -> int:
        """About the size of this run's largest checkpoint: today's state with Adam's two moments per weight once
        they exist and, with save_replay, a full replay (counted, not copied)."""
        extra = self.replay.nbytes if self.cfg.save_replay else 0
        if not self.learner.optimizer.state:
            extra += 2 * sum(p.numel() * p.element_size() for p in self.learner.q.parameters())
        return checkpoint_nbytes(self.state_dict(replay=False)) + extra

    def space_warning(self) -> str | None:
        """A warning with the numbers when the disk cannot hold keep_checkpoints checkpoints plus the one being
        written (a new one is complete before the oldest is deleted); None when it can."""
        size, copies = self.largest_nbytes(), self.cfg.keep_checkpoints + 1
        replaced = sum(p.stat().st_size for p in list_checkpoints(self.run_dir))  # what this run deletes as it goes
        free = free_bytes(self.run_dir)
        if copies * size <= free + replaced:
            return None
        have = format_bytes(free) + (f" (+{format_bytes(replaced)} in checkpoints it replaces)" if replaced else "")
        return (
            f"warning: checkpoints of this run take up to {format_bytes(size)} and {copies} exist at once "
            f"(keep_checkpoints={self.cfg.keep_checkpoints} and the one being written): "
            f"{format_bytes(copies * size)}, but {self.run_dir} has {have} free; free space, lower keep_checkpoints"
            + (" or set save_replay: false" if self.cfg.save_replay else "")
            + ", or the run will stop when the "
            "disk is full"
        )

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by `state_dict` with a compatible config."""
        check_resume_config(state["config"], self.cfg)
        try:
            self.learner.load_state_dict(strip_compile_prefix(state["learner"]))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint does not match this network ({str(exc).splitlines()[0][:100]}): "
                "resume with the run's own config"
            ) from None
        self.counters.load(state["counters"])
        self.set_rng_state(state["rng"])
        self.collector.load_state_dict(state)
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        self.evaluator.load_state_dict(state)
        best = read_best(self.run_dir)
        if best is not None and (self.evaluator.best is None or best[1] > self.evaluator.best[1]):
            self.evaluator.best = best  # written after this checkpoint, before the run stopped: still to beat
        self.finite.commit(self.counters.env_step)

    def save_best(self, returns: list[float]) -> Path:
        """Write best.pt: the online network now, with the evaluation (Evaluator.best) that it just scored."""
        assert self.evaluator.best is not None, "save_best follows an evaluation that set Evaluator.best"
        step, mean, std = self.evaluator.best
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "counters": vars(self.counters).copy(),
            "learner": {"q": strip_compile_prefix(self.learner.q.state_dict())},
            "eval": {"env_step": step, "mean": mean, "std": std, "returns": list(returns)},
        }
        return write_atomically(payload, self.run_dir / BEST_FILE, "the best checkpoint")

    def save(self) -> Path:
        """Checkpoint the run; never with non-finite weights (`check_finite` rolls those back first)."""
        self.check_finite({})
        return self.write()

    def write(self) -> Path:
        return save_checkpoint(self.state_dict(), self.run_dir, self.counters.env_step, self.cfg.keep_checkpoints)

    def check_finite(self, metrics: dict[str, float]) -> None:
        """At a sync point: remember the learner state if it (and `metrics`) is finite; otherwise roll back to the
        last finite one and go on (up to cfg.nonfinite_skips times) or checkpoint it and raise TrainingDiverged."""
        c, guard = self.counters, self.finite
        if guard.is_finite(metrics):
            guard.commit(c.env_step)
            return
        guard.rollback()
        message = divergence_message(self.cfg, metrics, guard.step, c.env_step)
        if c.nonfinite_skips < self.cfg.nonfinite_skips:
            c.nonfinite_skips += 1
            console.print(
                f"[yellow]{message}; rolled back to the weights of env step {guard.step} and going on "
                f"({c.nonfinite_skips} of nonfinite_skips={self.cfg.nonfinite_skips})[/]"
            )
            return
        path = self.write()
        raise TrainingDiverged(
            f"{message}. Saved the last finite weights (env step {guard.step}) as {path}: resume "
            f"with `fastdqn train --resume {self.run_dir} --learning-rate <lower>`, or set "
            "nonfinite_skips to roll back and go on"
        )


def rng_key(generator: torch.Generator) -> str:
    """Where a checkpoint keeps a generator's state: "cuda" for a CUDA generator, else "torch"."""
    return "cuda" if generator.device.type == "cuda" else "torch"


def read_best(run_dir: Path) -> tuple[int, float, float] | None:
    """(env step, mean, std) of the evaluation `run_dir/best.pt` holds, or None without one."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    best = load_checkpoint(path, mmap=True)["eval"]
    return int(best["env_step"]), float(best["mean"]), float(best["std"])


def load_run_checkpoint(path: Path, device: torch.device | str) -> dict[str, Any]:
    """A checkpoint file of this fastdqn's format, or CheckpointError naming the format it has."""
    state = load_checkpoint(path, map_location=device)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has format {state.get('format')}, this fastdqn reads "
            f"{CHECKPOINT_FORMAT}: evaluate it with the fastdqn version that wrote it"
        )
    return state
