"""A circular replay buffer of preallocated tensors on the training device.

A vector step of N envs is added in one call, as one slice copy. The capacity is rounded up to a multiple of N,
so the layout is fixed: slot `k * N + e` holds env `e`'s transition of some vector step, and the same env's
next transition is N slots later (mod capacity). Sampling draws indices on the device, so neither call
synchronises with the host. Pixel observations (uint8) are kept as
uint8 and become float only inside the network.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    obs: torch.Tensor  # (B, *obs_shape), stored dtype
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_obs: torch.Tensor  # (B, *obs_shape): the true next observation (the final one at an episode end)
    terminated: torch.Tensor  # (B,) float32: 1 where the episode ended in a terminal state (no bootstrap)


class ReplayBuffer:
    """Fixed-capacity FIFO of transitions; the oldest are overwritten once it is full."""

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                 device: torch.device):
        capacity = -(-capacity // num_envs) * num_envs  # round up to whole vector steps
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        self.obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.next_obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage().values())

    def _storage(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "next_obs": self.next_obs, "actions": self.actions,
                "rewards": self.rewards, "terminated": self.terminated}

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_obs: torch.Tensor, terminated: torch.Tensor) -> None:
        """Store one vector step: one transition per env (leading dim num_envs), tensors already on the device."""
        n = self.num_envs
        if obs.shape[0] != n:
            raise ValueError(f"add expects one transition per env ({n}), got {obs.shape[0]}")
        new = {"obs": obs, "next_obs": next_obs, "actions": actions, "rewards": rewards, "terminated": terminated}
        for name, dest in self._storage().items():
            dest[self.pos:self.pos + n] = new[name]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        """Uniform sample with replacement over the filled slots, indices drawn on the device."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.gather(idx)

    def gather(self, idx: torch.Tensor) -> Batch:
        return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx])

    def state_dict(self) -> dict:
        """Filled part of the buffer plus its position, for checkpoints (tensors and ints only)."""
        return {"pos": self.pos, "size": self.size, **{k: v[:self.size].clone() for k, v in self._storage().items()}}

    def load_state_dict(self, state: dict) -> None:
        size = state["size"]
        if size > self.capacity:
            raise ValueError(f"saved replay holds {size} transitions, more than this buffer's capacity {self.capacity}")
        for name, dest in self._storage().items():
            dest[:size] = state[name].to(self.device)
        self.pos, self.size = state["pos"], size
