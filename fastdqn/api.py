"""fastdqn's public Python API: train a run, evaluate it, load its policy.

The `fastdqn` command, the experiments (ablations, sweeps) and the benchmarks all train through `train`, so a
run started from Python is exactly a run started from the command line.

    import fastdqn
    result = fastdqn.train(fastdqn.Config(env_id="CartPole-v1", total_steps=20_000))
    print(result.final_eval_mean, result.run_dir)
    print(fastdqn.evaluate(result.run_dir, episodes=20).mean)
    policy = fastdqn.load_policy(result.run_dir)      # actions = policy(observations)
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fastdqn import spaces
from fastdqn.checkpoint import (
    BEST_FILE,
    check_resume_config,
    latest_checkpoint,
    list_checkpoints,
    remove_partial_writes,
    strip_compile_prefix,
)
from fastdqn.checkpointer import load_run_checkpoint
from fastdqn.config import Config, from_dict
from fastdqn.devices import resolve_device, use_device
from fastdqn.disk import run_write
from fastdqn.errors import CheckpointError, ConfigError, DiskFull
from fastdqn.logs import console
from fastdqn.population import (
    POPULATION_FILE,
    Population,
    PopulationResult,
    read_population_file,
    write_population_file,
)
from fastdqn.rundir import CONFIG_FILE, LOCK_FILE, RunDirLock, default_run_dir, resume_point, write_config
from fastdqn.trainer import Trainer, TrainResult

if TYPE_CHECKING:
    from fastdqn.tracking import Tracking

__all__ = [
    "EvalResult",
    "Policy",
    "PopulationResult",
    "TrainResult",
    "evaluate",
    "load_policy",
    "train",
    "train_population",
]

EVAL_FILE = "eval.json"


def train(
    config: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    overwrite: bool = False,
    runs_root: str | Path = "runs",
    show_progress: bool = True,
    on_eval: Callable[[int, float], bool] | None = None,
    track: Tracking | None = None,
) -> TrainResult:
    """Train a DQN agent and return how the run went (its run dir holds checkpoints, logs and metrics).

    A new run writes to `run_dir` (default `runs_root/<env>-s<seed>-<time>`), which must be empty unless
    `overwrite`. `resume=True` continues the stopped run in `run_dir` from its newest checkpoint; `config` is
    then None (go on as saved) or the run's config with changes a resume may make (e.g. a larger total_steps).
    The run dir is locked while this trains: a second process training into it gets RunDirLocked.
    `on_eval(env_step, mean_return)` is called after each periodic evaluation; returning True stops the run as
    Ctrl-C does (checkpoint saved, resumable; `stopped_early` in the result): a search prunes runs this way.
    `track` also sends the run's scalars, config and result to Weights & Biases (`fastdqn.tracking`).
    """
    if (config is not None and config.agents > 1) or (resume and run_dir and is_population(Path(run_dir))):
        raise ConfigError(
            "a population (agents > 1) trains with fastdqn.train_population, which returns every agent's result"
        )
    if resume:
        run_dir = _existing_run_dir(run_dir)
        _, cfg = _resume_config(run_dir, config)  # a config the run cannot take fails here, before anything is written
        with disk_full_fix(run_dir, cfg), RunDirLock(run_dir):
            trainer = _resumed_trainer(run_dir, config, show_progress)
            try:
                return _run(trainer, on_eval, track)
            finally:
                trainer.close()
    cfg = (config if config is not None else Config()).validate()
    resolve_device(cfg.device)  # fail before touching the disk
    run_dir = _new_run_dir(cfg, run_dir, runs_root, overwrite)
    trainer = Trainer(cfg, run_dir, show_progress=show_progress)  # bad envs fail here, before the disk
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with disk_full_fix(run_dir, cfg), RunDirLock(run_dir):
            for path in _contents(run_dir):  # read under the lock: what --overwrite replaces
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            write_config(cfg, run_dir)
            return _run(trainer, on_eval, track)
    finally:
        trainer.close()


def _existing_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        raise ConfigError("resume=True continues a run in place: pass its run_dir")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist: pass a dir under runs/ made by `fastdqn train`")
    return run_dir


def _new_run_dir(cfg: Config, run_dir: str | Path | None, runs_root: str | Path, overwrite: bool) -> Path:
    """The dir a new run writes to, refused when it holds something and `overwrite` is off."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, Path(runs_root))
    if run_dir.exists() and _contents(run_dir) and not overwrite:
        raise ConfigError(
            f"run dir '{run_dir}' already exists: pass --resume {run_dir} to continue it, "
            "--overwrite to replace it, or another --run-dir"
        )
    return run_dir


def is_population(run_dir: Path) -> bool:
    """Is `run_dir` a population's (population.json), rather than one agent's?"""
    return (Path(run_dir) / POPULATION_FILE).is_file()


def train_population(
    config: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    *,
    values: dict[str, list[Any]] | None = None,
    dirs: list[Path] | None = None,
    overwrite: bool = False,
    runs_root: str | Path = "runs",
    show_progress: bool = True,
) -> PopulationResult:
    """Train `config.agents` agents together in one process (population.py) and return each one's result.

    Agent k is `config` with seed + k and the k-th of each list in `values` (seed or keys of
    population.AGENT_KEYS); its run dir is `run_dir/agent-k` (or `dirs[k]`), a standalone run's in every way.
    `resume=True` continues the population in `run_dir` from the newest checkpoint every agent has (`config`
    None, or with changes a resume may make).
    """
    if resume:
        run_dir = _existing_run_dir(run_dir)
        saved = read_population_file(run_dir)
        if saved is None:
            raise CheckpointError(f"'{run_dir}' has no {POPULATION_FILE}: resume a single run with fastdqn.train")
        values, dirs = saved
        cfg = (config if config is not None else from_dict(saved_config(run_dir), where=str(run_dir))).validate()
        with disk_full_fix(run_dir, cfg), contextlib.ExitStack() as locks:
            for path in [run_dir, *dirs]:
                locks.enter_context(RunDirLock(path))
            states = _lockstep_checkpoints(dirs)
            population = Population(cfg, run_dir, show_progress, values, dirs)
            try:
                if states:
                    population.restore([load_run_checkpoint(path, "cpu") for path in states])
                else:
                    console.print(f"[yellow]{run_dir} has no checkpoint yet: training it again from env step 0[/]")
                write_config(cfg, run_dir)
                for agent_cfg, path in zip(population.cfgs, dirs):
                    write_config(agent_cfg, path)
                return population.run()
            finally:
                population.close()
    cfg = (config if config is not None else Config()).validate()
    resolve_device(cfg.device)
    run_dir = _new_run_dir(cfg, run_dir, runs_root, overwrite)
    population = Population(cfg, run_dir, show_progress, values, dirs)  # bad envs and configs fail here
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with disk_full_fix(run_dir, cfg), contextlib.ExitStack() as locks:
            locks.enter_context(RunDirLock(run_dir))
            for path in _contents(run_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            for path in population.dirs:  # (agent dirs outside run_dir, an experiment's, are not emptied)
                path.mkdir(parents=True, exist_ok=True)
                locks.enter_context(RunDirLock(path))
            write_config(cfg, run_dir)
            write_population_file(run_dir, cfg, values or {}, population.dirs)
            for agent_cfg, path in zip(population.cfgs, population.dirs):
                write_config(agent_cfg, path)
            return population.run()
    finally:
        population.close()


def _lockstep_checkpoints(dirs: list[Path]) -> list[Path]:
    """Each agent's checkpoint of the newest env step that all agents have one of ([] before the first); a kill
    while the agents were saving leaves some one checkpoint ahead, and the population goes back to the last
    common one."""
    names = [{p.name for p in list_checkpoints(d)} for d in dirs]
    common = set.intersection(*names)
    if not common:
        if any(names):
            raise CheckpointError(
                f"the agents in {dirs[0].parent} have no checkpoint of one env step in common (keep_checkpoints=1 "
                "and a kill while saving?): resume each agent dir on its own with fastdqn train --resume"
            )
        return []
    newest = max(common, key=lambda name: int(name.split("-")[1].split(".")[0]))
    return [d / newest for d in dirs]


def _run(trainer: Trainer, on_eval: Callable[[int, float], bool] | None, track: Tracking | None) -> TrainResult:
    """Train to the end; with `track`, inside a W&B run that gets every scalar and, at the end, the result."""
    if track is None:
        return trainer.run(on_eval)
    from fastdqn.tracking import WandbRun

    wandb_run = WandbRun(track, trainer.run_dir, trainer.cfg)
    try:
        result = trainer.run(on_eval, sinks=[wandb_run])
    except BaseException:
        wandb_run.finish(None)
        raise
    wandb_run.finish(result.summary())
    return result


@contextlib.contextmanager
def disk_full_fix(run_dir: Path, cfg: Config) -> Iterator[None]:
    """A DiskFull in the block says how to go on with this run: free space, then resume it (with fewer or smaller
    checkpoints if those flags apply); its newest complete checkpoint is intact."""
    try:
        yield
    except DiskFull as exc:
        if not (run_dir / CONFIG_FILE).is_file():
            raise exc.with_fix("free space there and run the command again") from exc
        found = list_checkpoints(run_dir)
        since = f"from {found[-1].name} " if found else ""
        smaller = [
            flag
            for flag, applies in (
                ("--keep-checkpoints 1", cfg.keep_checkpoints > 1),
                ("--no-save-replay", cfg.save_replay),
            )
            if applies
        ]
        room = f" (add {' or '.join(smaller)} to keep fewer or smaller checkpoints)" if smaller else ""
        raise exc.with_fix(
            f"free space there, then resume {since}with: fastdqn train --resume {run_dir}{room}"
        ) from exc


def _contents(run_dir: Path) -> list[Path]:
    """What a run dir holds besides its lock file."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_FILE]


def _resume_config(run_dir: Path, config: Config | None) -> tuple[Path | None, Config]:
    """(newest checkpoint or None, the config to go on with), checked against what the run saved."""
    newest, saved = resume_point(run_dir)
    cfg = (config if config is not None else from_dict(saved, where=str(run_dir))).validate()
    check_resume_config(saved, cfg)
    return newest, cfg


def _resumed_trainer(run_dir: Path, config: Config | None, show_progress: bool) -> Trainer:
    """The Trainer of a stopped run at its newest checkpoint (at step 0 if it stopped before its first one)."""
    newest, cfg = _resume_config(run_dir, config)  # again under the lock: the newest checkpoint is final now
    trainer = Trainer(cfg, run_dir, show_progress=show_progress)
    remove_partial_writes(run_dir)
    if newest is None:
        console.print(f"[yellow]{run_dir} has no checkpoint yet: training it again from env step 0[/]")
    else:
        try:
            trainer.restore(load_run_checkpoint(newest, "cpu"))
        except BaseException:
            trainer.close()
            raise
    if trainer.counters.env_step >= cfg.total_steps:  # e.g. killed between its last checkpoint and exiting
        console.print(
            f"[yellow]{run_dir} already reached total_steps={cfg.total_steps}: evaluating it again; pass a "
            "larger --total-steps to train it further[/]"
        )
    write_config(cfg, run_dir)
    return trainer


def saved_config(run_dir: str | Path) -> dict:
    """The config a resume of `run_dir` starts from (its newest checkpoint's, or config.yaml before any)."""
    return resume_point(Path(run_dir))[1]


class Policy:
    """A trained Q-network as a policy: greedy (or epsilon-greedy) actions for a batch of observations."""

    def __init__(self, config: Config, checkpoint: Path, env_step: int, device: torch.device):
        from fastdqn.envs import make_vector_env
        from fastdqn.learner import DQNLearner

        probe = make_vector_env(config, 1, mode="sync")
        obs_shape = spaces.obs_shape(probe.single_observation_space)
        n_actions = spaces.n_actions(probe.single_action_space)
        probe.close()
        self.config, self.checkpoint, self.env_step, self.device = config, checkpoint, env_step, device
        self._learner = DQNLearner(config, obs_shape, n_actions, device)
        self.q = self._learner.q.eval()

    def act(self, obs: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
        """Actions for a batch of observations already on the policy's device."""
        return self._learner.act(obs, epsilon)

    def __call__(self, obs: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
        """Greedy actions for a NumPy batch of observations, as a NumPy array."""
        return self.act(torch.as_tensor(np.asarray(obs), device=self.device), epsilon).cpu().numpy()


def checkpoint_of(path: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file to evaluate: `path` itself if it is a file; for a run dir, `checkpoint` = "best"
    (the default: best.pt, or the newest checkpoint of a run without one), "last" (the newest checkpoint) or the
    path of a checkpoint file."""
    target = Path(path)
    if target.is_file():
        if checkpoint is not None:
            raise ConfigError(f"'{target}' is a checkpoint file already: pass its run dir to choose --checkpoint")
        return target
    if checkpoint not in (None, "best", "last"):
        chosen = Path(checkpoint)
        if not chosen.is_file():
            raise CheckpointError(
                f"checkpoint '{checkpoint}' does not exist: use best, last or the path of a ckpt-*.pt or best.pt file"
            )
        return chosen
    newest = latest_checkpoint(target)  # a clear error for a dir that is no run
    best = target / BEST_FILE
    if checkpoint != "last" and best.is_file():
        return best
    if checkpoint == "best":
        console.print(f"[yellow]{target} has no {BEST_FILE} (no evaluation finished yet): using {newest.name}[/]")
    return newest


def load_policy(path: str | Path, device: str | None = None, checkpoint: str | None = None) -> Policy:
    """The policy of a run (its best.pt unless `checkpoint` says otherwise, see `checkpoint_of`) or of one
    checkpoint file, on `device` (default: the run's)."""
    ckpt = checkpoint_of(path, checkpoint)
    state = load_run_checkpoint(ckpt, "cpu")
    cfg = from_dict(state["config"]).updated(num_envs=1, compile=False, **({"device": device} if device else {}))
    run_device = resolve_device(cfg.device)
    use_device(run_device, cfg.tf32)
    policy = Policy(cfg, ckpt, int(state["counters"]["env_step"]), run_device)
    try:
        policy.q.load_state_dict(strip_compile_prefix(state["learner"]["q"]))
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint '{ckpt}' does not match its config's network ({str(exc).splitlines()[0][:100]})"
        ) from None
    return policy


@dataclass
class EvalResult:
    """Returns of a seeded evaluation of one checkpoint (episode i on an env reset with its own seed)."""

    checkpoint: str
    env_step: int
    episodes: int
    seed: int
    epsilon: float
    mean: float
    std: float
    returns: list[float]
    video: str | None = None
    video_return: float | None = None


def evaluate(
    path: str | Path,
    episodes: int = 10,
    seed: int | None = None,
    epsilon: float | None = None,
    device: str | None = None,
    video: bool = False,
    checkpoint: str | None = None,
) -> EvalResult:
    """Evaluate a run's best.pt (or `checkpoint`: "last", a file; see `checkpoint_of`), or one checkpoint file,
    and write `eval.json` into its run dir.

    `seed` and `epsilon` default to the run's config (seed, eval_epsilon); `video` also records one episode
    (a whole game for Atari) to `<run dir>/<checkpoint>-seed<seed>.mp4` (a .gif where no mp4 codec opens).
    """
    from fastdqn.evaluation import evaluate as run_episodes

    policy = load_policy(path, device, checkpoint)
    cfg = policy.config
    epsilon = cfg.eval_epsilon if epsilon is None else epsilon
    seed = cfg.seed if seed is None else seed
    returns = run_episodes(lambda o: policy.act(o, epsilon), cfg, episodes, seed, policy.device)
    result = EvalResult(
        policy.checkpoint.name,
        policy.env_step,
        episodes,
        seed,
        epsilon,
        float(np.mean(returns)),
        float(np.std(returns)),
        returns.tolist(),
    )
    run_dir = policy.checkpoint.parent
    if video:
        from fastdqn.video import record_episode, write_video

        frames, result.video_return = record_episode(lambda o: policy.act(o, epsilon), cfg, seed, policy.device)
        result.video = str(write_video(frames, run_dir / f"{policy.checkpoint.stem}-seed{seed}.mp4"))
    text = json.dumps(asdict(result), indent=2)
    with run_write(run_dir / EVAL_FILE, "the evaluation", len(text.encode())):
        (run_dir / EVAL_FILE).write_text(text)
    return result
