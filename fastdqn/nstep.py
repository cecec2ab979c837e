"""n-step returns computed on the device from the replay buffer's fixed slot layout.

Slot `k * N + e` holds env e's transition of some vector step and env e's next transition is N slots later
(mod capacity), so the n transitions that follow a sampled one are a strided gather, all n at once as a
(B, n) block: no Python loop at all. Which of them count is a mask: the chain stops after the first transition
that ended its episode (terminated: no bootstrap; truncated: bootstrap from that transition's true final
observation), and before any slot not written yet (it never passes the write head, so it never reads an
older, overwritten transition).
"""

from __future__ import annotations

import torch


def nstep_returns(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    idx: torch.Tensor,
    write_pos: torch.Tensor | int,
    num_envs: int,
    n: int,
    gamma: float,
    capacity: int | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For start slots `idx`: (discounted reward sums, slot whose next_obs/terminated bootstrap, gamma^k).

    `rewards`, `terminated`, `truncated` are the buffer's whole (capacity,) columns; `write_pos` is the next
    slot to be written (a device tensor in the buffer, so that a CUDA graph capturing this reads its new value).
    k (1..n) is the number of rewards summed for each sample. A population's columns hold K rings of `capacity`
    slots one after another: `idx` then counts inside a ring and `base` (B,) is the first slot of each sample's.
    """
    capacity = rewards.shape[0] if capacity is None else capacity
    j = torch.arange(n, device=idx.device)
    slots = torch.remainder(idx.unsqueeze(1) + j * num_envs, capacity)  # (B, n): the same env's next n slots
    if base is not None:
        slots = slots + base.unsqueeze(1)
    # Transitions of the same env written after slot idx (the newest vector step has none).
    newer = torch.remainder(write_pos - 1 - idx, capacity) // num_envs
    ended = ((terminated[slots] != 0) | (truncated[slots] != 0)).int()
    # Step j counts if it has been written and no earlier step of the chain ended its episode (a prefix).
    use = (j <= newer.unsqueeze(1)) & (torch.cumsum(ended, dim=1) - ended == 0)
    powers = torch.pow(gamma, j.float())
    returns = (use * powers * rewards[slots]).sum(dim=1)
    steps = use.sum(dim=1)  # >= 1: the sampled transition itself always counts
    last = slots.gather(1, (steps - 1).unsqueeze(1)).squeeze(1)
    return returns, last, torch.pow(gamma, steps.float())
