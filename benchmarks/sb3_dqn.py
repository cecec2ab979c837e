"""One Stable-Baselines3 DQN run, for benchmarks/learning.py's side-by-side rows. Runs in a venv that has
stable-baselines3 (fastdqn does not depend on it), and imports nothing from fastdqn.

    /path/to/sb3-venv/bin/python benchmarks/sb3_dqn.py --env Acrobot-v1 --seed 1 --hyperparams '{...}' \
        --total-steps 100000 --eval-every 10000 --eval-episodes 10 --out run.json

`--hyperparams` are SB3 DQN keyword arguments as rl-zoo writes them (net_arch is given as a list). Greedy
evaluations run every `--eval-every` env steps and at the end, episode i on an env reset with seed
`seed + 1_000_003 + i`, as fastdqn evaluates; the wall and CPU times cover training and those evaluations,
as fastdqn's do. One torch thread, as fastdqn's benchmark runs use.
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback

EVAL_SEED_OFFSET = 1_000_003  # fastdqn.evaluation.EVAL_SEED_OFFSET


def greedy_returns(model: DQN, env_id: str, episodes: int, seed: int) -> list[float]:
    returns = []
    for i in range(episodes):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=seed + EVAL_SEED_OFFSET + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(int(action))
            total += float(reward)
            done = terminated or truncated
        env.close()
        returns.append(total)
    return returns


class Evaluate(BaseCallback):
    """Greedy evaluation every `every` env steps into `evals` as [env step, mean return]."""

    def __init__(self, env_id: str, every: int, episodes: int, seed: int):
        super().__init__()
        self.env_id, self.every, self.episodes, self.seed = env_id, every, episodes, seed
        self.evals: list[list[float]] = []

    def _on_step(self) -> bool:
        if self.every and self.num_timesteps % self.every == 0:
            self.evals.append(
                [self.num_timesteps, float(np.mean(greedy_returns(self.model, self.env_id, self.episodes, self.seed)))]
            )
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--hyperparams", required=True, help="JSON object of SB3 DQN keyword arguments")
    parser.add_argument("--total-steps", type=int, required=True)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kwargs = json.loads(args.hyperparams)
    net_arch = kwargs.pop("net_arch", None)
    if "learning_rate_end" in kwargs:  # fastdqn's linear LR schedule: SB3 passes progress_remaining, 1 -> 0
        lr0, lr1 = kwargs["learning_rate"], kwargs.pop("learning_rate_end")
        kwargs["learning_rate"] = lambda remaining: lr1 + (lr0 - lr1) * remaining
    start, cpu_start = time.perf_counter(), time.process_time()
    model = DQN(
        "MlpPolicy",
        gym.make(args.env),
        seed=args.seed,
        device="cpu",
        verbose=0,
        policy_kwargs={"net_arch": net_arch} if net_arch else None,
        **kwargs,
    )
    callback = Evaluate(args.env, args.eval_every, args.eval_episodes, args.seed)
    model.learn(total_timesteps=args.total_steps, callback=callback)
    final = greedy_returns(model, args.env, args.eval_episodes, args.seed)
    if callback.evals and callback.evals[-1][0] == model.num_timesteps:
        callback.evals.pop()  # taken before the last update of the run: the final evaluation replaces it
    callback.evals.append([model.num_timesteps, float(np.mean(final))])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    import stable_baselines3

    with open(args.out, "w") as f:
        json.dump(
            {
                "env_id": args.env,
                "seed": args.seed,
                "hyperparams": json.loads(args.hyperparams),
                "env_steps": int(model.num_timesteps),
                "final_eval": float(np.mean(final)),
                "best_eval": max(m for _, m in callback.evals),
                "evals": callback.evals,
                "wall_time": round(wall, 2),
                "cpu_time": round(cpu, 1),
                "sb3": stable_baselines3.__version__,
                "torch": torch.__version__,
            },
            f,
        )


if __name__ == "__main__":
    main()
