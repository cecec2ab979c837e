"""A faithful single-file copy of CleanRL's `dqn.py` training loop, the speed baseline of `fastdqn bench`.

Same shape as https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/dqn.py: one CartPole env in a
SyncVectorEnv, a 120-84 MLP, a numpy replay buffer (like SB3's: numpy arrays, `np.random.randint` sampling,
`torch.tensor(...).to(device)` per batch), epsilon-greedy with a network forward only on greedy steps, one MSE
update of batch 128 every `train_frequency` (10) env steps after `learning_starts`, a hard target copy every
500 steps, and the loss / Q-value `.item()` logging every 100 steps. Only the TensorBoard writer and the
command-line parsing are left out (the logged values are kept in a list).

    python benchmarks/cleanrl_dqn.py --total-steps 20000
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Args:
    env_id: str = "CartPole-v1"
    seed: int = 1
    total_timesteps: int = 500_000
    learning_rate: float = 2.5e-4
    buffer_size: int = 10_000
    gamma: float = 0.99
    tau: float = 1.0
    target_network_frequency: int = 500
    batch_size: int = 128
    start_e: float = 1.0
    end_e: float = 0.05
    exploration_fraction: float = 0.5
    learning_starts: int = 10_000
    train_frequency: int = 10


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(nn.Linear(obs_dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                     nn.Linear(84, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class NumpyReplay:
    """SB3's ReplayBuffer for one env, reduced to what dqn.py uses."""

    def __init__(self, size: int, obs_dim: int, device: torch.device):
        self.size, self.device, self.pos, self.full = size, device, 0, False
        self.observations = np.zeros((size, obs_dim), dtype=np.float32)
        self.next_observations = np.zeros((size, obs_dim), dtype=np.float32)
        self.actions = np.zeros((size, 1), dtype=np.int64)
        self.rewards = np.zeros((size, 1), dtype=np.float32)
        self.dones = np.zeros((size, 1), dtype=np.float32)

    def add(self, obs: np.ndarray, next_obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray) -> None:
        self.observations[self.pos] = np.array(obs)
        self.next_observations[self.pos] = np.array(next_obs)
        self.actions[self.pos] = np.array(action)
        self.rewards[self.pos] = np.array(reward)
        self.dones[self.pos] = np.array(done)
        self.pos += 1
        if self.pos == self.size:
            self.full, self.pos = True, 0

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        upper = self.size if self.full else self.pos
        idx = np.random.randint(0, upper, size=batch_size)
        data = (self.observations[idx], self.actions[idx], self.next_observations[idx], self.dones[idx],
                self.rewards[idx])
        return tuple(torch.tensor(d).to(self.device) for d in data)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def train(args: Args, device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Run dqn.py's loop; returns env steps/s over the whole run (like its SPS) and the episodes' mean return."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    envs = gym.vector.SyncVectorEnv([lambda: gym.wrappers.RecordEpisodeStatistics(gym.make(args.env_id))],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_dim, n_actions = envs.single_observation_space.shape[0], int(envs.single_action_space.n)
    q_network = QNetwork(obs_dim, n_actions).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = QNetwork(obs_dim, n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = NumpyReplay(args.buffer_size, obs_dim, device)
    logged: list[tuple[float, float]] = []
    returns: list[float] = []
    start_time = time.time()

    obs, _ = envs.reset(seed=args.seed)
    for global_step in range(args.total_timesteps):
        epsilon = linear_schedule(args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps),
                                  global_step)
        if random.random() < epsilon:
            actions = np.array([envs.single_action_space.sample() for _ in range(envs.num_envs)])
        else:
            q_values = q_network(torch.Tensor(obs).to(device))
            actions = torch.argmax(q_values, dim=1).cpu().numpy()
        next_obs, rewards, terminations, truncations, infos = envs.step(actions)
        if "episode" in infos.get("final_info", {}):
            returns += [float(r) for r in infos["final_info"]["episode"]["r"][infos["final_info"]["_episode"]]]
        real_next_obs = next_obs.copy()
        for idx, trunc in enumerate(truncations):
            if trunc:
                real_next_obs[idx] = infos["final_obs"][idx]
        rb.add(obs[0], real_next_obs[0], actions[0], rewards[0], terminations[0])
        obs = next_obs

        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                b_obs, b_actions, b_next_obs, b_dones, b_rewards = rb.sample(args.batch_size)
                with torch.no_grad():
                    target_max, _ = target_network(b_next_obs).max(dim=1)
                    td_target = b_rewards.flatten() + args.gamma * target_max * (1 - b_dones.flatten())
                old_val = q_network(b_obs).gather(1, b_actions).squeeze()
                loss = F.mse_loss(td_target, old_val)
                if global_step % 100 == 0:
                    logged.append((loss.item(), old_val.mean().item()))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if global_step % args.target_network_frequency == 0:
                for target_param, q_param in zip(target_network.parameters(), q_network.parameters()):
                    target_param.data.copy_(args.tau * q_param.data + (1.0 - args.tau) * target_param.data)
    wall = time.time() - start_time
    envs.close()
    return {"sps": args.total_timesteps / wall, "wall_time": wall, "episodes": len(returns),
            "mean_return_last_20": float(np.mean(returns[-20:])) if returns else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=Args.total_timesteps)
    parser.add_argument("--learning-starts", type=int, default=Args.learning_starts)
    parser.add_argument("--seed", type=int, default=Args.seed)
    ns = parser.parse_args()
    print(train(Args(total_timesteps=ns.total_steps, learning_starts=ns.learning_starts, seed=ns.seed)))


if __name__ == "__main__":
    main()
