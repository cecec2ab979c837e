"""Proportional prioritized experience replay (Schaul et al., 2016), sampled on the device.

Each slot keeps p_i^alpha with p_i = |TD error| + eps; new transitions get the largest value seen so far, so
each is replayed at least once soon. A batch is drawn by stratified inverse-CDF sampling: one uniform draw in
each of B equal slices of the total, located with `searchsorted` on a float64 cumulative sum (one
vectorised pass over the filled slots; no Python loop over the batch, no host sync). Importance weights
(N * P(i))^-beta are divided by the largest weight any filled slot could get, so they lie in (0, 1].
"""

from __future__ import annotations

import torch

from fastdqn.replay import Batch, TransitionStorage


def proportional_sample(priorities: torch.Tensor, batch_size: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, importance weights) of a stratified sample with P(i) = priorities[i] / sum(priorities).

    `priorities` are the filled slots' p^alpha (all > 0).
    """
    cdf = priorities.double().cumsum(0)
    total = cdf[-1]
    strata = torch.arange(batch_size, device=priorities.device, dtype=torch.float64)
    u = (strata + torch.rand(batch_size, device=priorities.device, dtype=torch.float64)) * (total / batch_size)
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=priorities.shape[0] - 1)
    n = priorities.shape[0]
    weights = (n * priorities[idx].double() / total) ** -beta
    max_weight = (n * priorities.min().double() / total) ** -beta
    return idx, (weights / max_weight).float()


class PrioritizedReplayBuffer(TransitionStorage):
    """Transitions sampled in proportion to their priorities; batches carry importance weights and their slots.

    Set `beta` (the importance-weight exponent, annealed by the trainer) before sampling, and call
    `update_priorities` with the batch's |TD errors| after each update.
    """

    graph_sampling = False  # the draw reads the fill level on the host

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: torch.dtype,
        device: torch.device,
        n_step: int = 1,
        gamma: float = 0.99,
        alpha: float = 0.6,
        eps: float = 1e-6,
    ):
        super().__init__(capacity, num_envs, obs_shape, obs_dtype, device, n_step, gamma)
        self.alpha, self.eps, self.beta = alpha, eps, 1.0
        self.priorities = torch.zeros(self.capacity, dtype=torch.float32, device=device)  # p^alpha per slot
        self.max_priority = torch.ones((), dtype=torch.float32, device=device)  # largest p^alpha so far

    def add(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        truncated: torch.Tensor | None = None,
    ) -> None:
        """Store one vector step (as TransitionStorage.add) at the largest priority seen so far."""
        start = self.pos
        super().add(obs, actions, rewards, next_obs, terminated, truncated)
        self.priorities[start : start + self.num_envs] = self.max_priority

    def sample(self, batch_size: int) -> Batch:
        idx, weights = proportional_sample(self.priorities[: self.size], batch_size, self.beta)
        return self.gather(idx)._replace(weights=weights, indices=idx)

    @torch.no_grad()
    def update_priorities(self, idx: torch.Tensor, td_abs: torch.Tensor) -> None:
        """p = |TD error| + eps for the sampled slots (a slot drawn twice gets the same value both times)."""
        new = (td_abs.float().abs() + self.eps) ** self.alpha
        self.priorities[idx] = new
        torch.maximum(self.max_priority, new.max(), out=self.max_priority)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "priorities": self.priorities[: self.size].clone(),
            "max_priority": self.max_priority.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.priorities[: self.size] = state["priorities"].to(self.device)
        self.max_priority.copy_(state["max_priority"])
