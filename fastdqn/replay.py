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

from fastdqn.nstep import nstep_returns


class Batch(NamedTuple):
    obs: torch.Tensor  # (B, *obs_shape), stored dtype
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_obs: torch.Tensor  # (B, *obs_shape): the true next observation (the final one at an episode end)
    terminated: torch.Tensor  # (B,) float32: 1 where the episode ended in a terminal state (no bootstrap)
    discounts: torch.Tensor | None = None  # (B,) gamma^k of an n-step return; None = gamma (one step)
    weights: torch.Tensor | None = None  # (B,) importance weights of prioritized replay; None = all 1
    indices: torch.Tensor | None = None  # (B,) slots sampled, for priority updates


class ReplayBuffer:
    """Fixed-capacity FIFO of transitions; the oldest are overwritten once it is full."""

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                 device: torch.device, n_step: int = 1, gamma: float = 0.99):
        capacity = -(-capacity // num_envs) * num_envs  # round up to whole vector steps
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        self.n_step, self.gamma = n_step, gamma  # gather() returns n-step transitions when n_step > 1
        self.obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.next_obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.truncated = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots
        self.filled = torch.zeros((), dtype=torch.int64, device=device)  # `size` on the device, for graph_sample

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._storage().values())

    def _storage(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "next_obs": self.next_obs, "actions": self.actions,
                "rewards": self.rewards, "terminated": self.terminated, "truncated": self.truncated}

    def add(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
            next_obs: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor | None = None) -> None:
        """Store one vector step: one transition per env (leading dim num_envs), tensors already on the device.

        `truncated` (episode cut by a time limit) only matters to n-step returns, which stop there.
        """
        n = self.num_envs
        if obs.shape[0] != n:
            raise ValueError(f"add expects one transition per env ({n}), got {obs.shape[0]}")
        if truncated is None:
            truncated = torch.zeros_like(terminated)
        new = {"obs": obs, "next_obs": next_obs, "actions": actions, "rewards": rewards, "terminated": terminated,
               "truncated": truncated}
        for name, dest in self._storage().items():
            dest[self.pos:self.pos + n] = new[name]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._refresh_bounds()

    def _refresh_bounds(self) -> None:
        """Copy the fill level to the device (a kernel launch, no host sync) for `graph_sample`."""
        self.filled.fill_(self.size)

    def sample(self, batch_size: int) -> Batch:
        """Uniform sample with replacement over the filled slots, indices drawn on the device."""
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.gather(idx)

    @property
    def graph_sampling(self) -> bool:
        """Whether `graph_sample` may be captured in a CUDA graph (n-step returns read the write position on the
        host)."""
        return self.n_step == 1

    def graph_sample(self, batch_size: int) -> Batch:
        """A uniform sample like `sample`, computed from device tensors only (the fill level is `filled`), so a
        CUDA graph that captures it keeps sampling all filled slots as the buffer grows."""
        idx = (torch.rand(batch_size, device=self.device) * self.filled).long()
        return self.gather(torch.minimum(idx, self.filled - 1))  # rand can round up to exactly 1.0 in float32

    def newest(self) -> Batch:
        """The last vector step added, one transition per env in env order (the no-replay ablation's batch)."""
        idx = torch.remainder(self.pos - self.num_envs + torch.arange(self.num_envs, device=self.device), self.capacity)
        return self.gather(idx)

    def gather(self, idx: torch.Tensor) -> Batch:
        """The transitions starting at slots `idx`: one-step, or n-step returns when n_step > 1."""
        if self.n_step == 1:
            return Batch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx],
                         self.terminated[idx])
        returns, last, discounts = nstep_returns(self.rewards, self.terminated, self.truncated, idx, self.pos,
                                                 self.num_envs, self.n_step, self.gamma)
        return Batch(self.obs[idx], self.actions[idx], returns, self.next_obs[last], self.terminated[last],
                     discounts)

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
        self._refresh_bounds()
