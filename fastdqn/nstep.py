"""n-step returns computed on the device from the replay buffer's fixed slot layout.

Slot `k * N + e` holds env e's transition of some vector step and env e's next transition is N slots later
(mod capacity), so the n transitions that follow a sampled one are a strided gather: no Python loop over the
batch, only over the n steps. The chain stops after the first transition that ended its episode (terminated:
no bootstrap; truncated: bootstrap from that transition's true final observation), and before any slot not
written yet (the chain never passes the write head, so it never reads an older, overwritten transition).
"""

from __future__ import annotations

import torch


def nstep_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor, idx: torch.Tensor,
                  write_pos: int, num_envs: int, n: int, gamma: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For start slots `idx`: (discounted reward sums, slot whose next_obs/terminated bootstrap, gamma^k).

    `rewards`, `terminated`, `truncated` are the buffer's whole (capacity,) columns; `write_pos` is the next
    slot to be written. k (1..n) is the number of rewards summed for each sample.
    """
    capacity = rewards.shape[0]
    # Transitions of the same env written after slot idx (the newest vector step has none).
    newer = torch.remainder(write_pos - 1 - idx, capacity) // num_envs
    returns = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    steps = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    last = idx
    alive = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    for j in range(n):
        slot = torch.remainder(idx + j * num_envs, capacity)
        use = alive & (newer >= j)
        returns = returns + torch.where(use, (gamma ** j) * rewards[slot], 0.0)
        last = torch.where(use, slot, last)
        steps = steps + use.float()
        alive = use & (terminated[slot] == 0) & (truncated[slot] == 0)
    return returns, last, torch.pow(gamma, steps)
