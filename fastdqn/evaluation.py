"""Greedy (or small-epsilon) evaluation on separately seeded envs: one episode per env, all stepped together; and
a run's periodic evaluations with their history."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from fastdqn.atari import evaluate_games
from fastdqn.config import Config
from fastdqn.envs import SameStepCartPole, has_native_vector_env, make_native_vector_env, make_vector_env
from fastdqn.learner import DQNLearner
from fastdqn.networks import is_pixel_shape
from fastdqn.spaces import obs_shape

EVAL_SEED_OFFSET = 1_000_003  # eval envs never share seeds with training envs


@contextlib.contextmanager
def own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for an evaluation and restore the caller's state after it.

    Evaluation then draws the same random numbers (epsilon > 0 exploration) whenever it runs, and evaluating
    during training never shifts the random numbers that training draws next.
    """
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def eval_seeds(seed: int, episodes: int) -> list[int]:
    """The env seeds of an evaluation of `episodes` episodes with seed `seed`: episode i's is
    seed + EVAL_SEED_OFFSET + i."""
    return [seed + EVAL_SEED_OFFSET + i for i in range(episodes)]


def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor],
    cfg: Config,
    episodes: int,
    seed: int,
    device: torch.device,
    seeds: list[int] | None = None,
) -> np.ndarray:
    """Returns of `episodes` episodes, episode i on an env reset with seed `seed + EVAL_SEED_OFFSET + i` (or with
    `seeds[i]`: a population evaluates all its agents' episodes at once).

    `policy` maps a batch of observations on `device` to actions; the caller decides greedy vs epsilon.
    """
    seeds = eval_seeds(seed, episodes) if seeds is None else seeds
    # One env per episode, each reset with its own seed. CartPole's are gymnasium's numpy env, one array step for
    # all of them, each started where its own seeded env starts: the same episodes as Python envs, several times
    # faster (tested); a population evaluates all its agents' episodes together.
    native = has_native_vector_env(cfg.env_id)
    envs = make_native_vector_env(cfg, len(seeds)) if native else make_vector_env(cfg, len(seeds), mode="sync")
    with own_rng(seed + EVAL_SEED_OFFSET, device):
        try:
            if is_pixel_shape(obs_shape(envs.single_observation_space)):  # NEXT_STEP envs; raw whole-game scores
                return evaluate_games(envs, policy, seeds, device)
            if isinstance(envs, SameStepCartPole):
                obs = envs.reset_each(seeds)
            else:
                obs, _ = envs.reset(seed=seeds)  # type: ignore[arg-type]  # one seed per env; VectorEnv says int
            returns = np.full(len(seeds), np.nan)
            while np.isnan(returns).any():
                actions = policy(torch.as_tensor(obs, device=device)).cpu().numpy()
                obs, _, _, _, infos = envs.step(actions)
                final = infos.get("final_info", {})
                if "episode" in final:
                    for i in np.flatnonzero(final["_episode"]):
                        if np.isnan(returns[i]):  # only each env's first episode counts
                            returns[i] = final["episode"]["r"][i]
            return returns
        finally:
            envs.close()


class Evaluator:
    """A training run's evaluations: `eval_episodes` episodes of the learner's current policy at `eval_epsilon`,
    seeded the same way every time, and the (env step, mean, std) of each so far, which checkpoints carry."""

    def __init__(self, cfg: Config, learner: DQNLearner):
        self.cfg, self.learner = cfg, learner
        # what plays the episodes of an evaluation at an env step; a population plays all its agents' at once
        self.play: Callable[[int], np.ndarray] = self.play_episodes
        self.evals: list[tuple[int, float, float]] = []
        self.best: tuple[int, float, float] | None = None  # the evaluation best.pt holds (step, mean, std)

    def evaluate(self, step: int) -> np.ndarray:
        """Evaluate now, at env step `step`, and record it; returns each episode's return."""
        returns = self.play(step)
        self.evals.append((step, float(returns.mean()), float(returns.std())))
        return returns

    def play_episodes(self, step: int) -> np.ndarray:
        """The returns of eval_episodes episodes of the learner's current policy at eval_epsilon."""
        cfg = self.cfg
        return evaluate(
            lambda obs: self.learner.act(obs, cfg.eval_epsilon), cfg, cfg.eval_episodes, cfg.seed, self.learner.device
        )

    def newest_is_best(self) -> bool:
        """Whether the newest evaluation beats every earlier one (and best.pt's); it then becomes the best."""
        newest = self.evals[-1]
        if self.best is not None and not newest[1] > self.best[1]:
            return False
        self.best = newest
        return True

    def steps_to_solve(self) -> int | None:
        """The first evaluated step whose mean reached the env's solve line (None: never, or it has none)."""
        line = self.cfg.solve_line
        return None if line is None else next((step for step, mean, _ in self.evals if mean >= line), None)

    def state_dict(self) -> dict[str, Any]:
        return {"evals": [list(e) for e in self.evals], "best_eval": list(self.best) if self.best else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evals = [tuple(e) for e in state["evals"]]
        best = state.get("best_eval")
        self.best = tuple(best) if best else None
