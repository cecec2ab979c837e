"""Replay on the training device: ring storages written a vector step at a time, and replays that sample them.

Storage. A vector step of N envs is written in one call, one slice copy per column. The capacity is rounded up to
a multiple of N, so the layout is fixed: slot `k * N + e` holds env `e`'s entry of some vector step, and the same
env's next entry is N slots later (mod capacity). `RingStorage` keeps that layout; `TransitionStorage` (here)
stores whole transitions and `FrameStorage` (frame_replay.py) each frame of a frame stack once. Pixel observations
and grid cells stay one byte each (uint8) and become float only inside the network.

Replay. A replay is a storage plus the rule that samples it: `ReplayBuffer` (uniform, here), `PrioritizedReplayBuffer`
(prioritized.py) and `FrameReplay` (frame_replay.py). All follow the one `Replay` protocol that the collection, the
updates and a captured CUDA graph use. Sampling draws indices on the device, so no call synchronises with the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from fastdqn.nstep import nstep_returns

# obs, actions, rewards, next_obs, terminated, discounts (or None), weights (or None): see Batch
LossInputs = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None
]


class Batch(NamedTuple):
    obs: torch.Tensor  # (B, *obs_shape), stored dtype
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_obs: torch.Tensor  # (B, *obs_shape): the true next observation (the final one at an episode end)
    terminated: torch.Tensor  # (B,) float32: 1 where the episode ended in a terminal state (no bootstrap)
    discounts: torch.Tensor | None = None  # (B,) gamma^k of an n-step return; None = gamma (one step)
    weights: torch.Tensor | None = None  # (B,) importance weights of prioritized replay; None = all 1
    indices: torch.Tensor | None = None  # (B,) slots sampled, for priority updates

    def at(self, i: int) -> Batch:
        """The i-th batch of batches stacked along a leading dim (`samples`: (n, B) or a population's (n, K, B))."""
        return Batch._make(None if t is None else t[i] for t in self)

    def loss_inputs(self) -> LossInputs:
        """What a TD loss takes of the batch, in the order of `batch_td_loss`'s batch arguments: every field but the
        sampled slots."""
        return self.obs, self.actions, self.rewards, self.next_obs, self.terminated, self.discounts, self.weights


class Replay(Protocol):
    """What the collection, the updates, a captured CUDA graph and checkpoints use of a replay.

    `add` takes one vector step in its storage's columns. A batch that carries `indices` (prioritized replay) gets
    its |TD errors| back through `update_priorities`. Where `graph_sampling` is true the replay is also a
    `GraphSampledReplay`. Transition replays also give `newest()`, the batch of the no-replay ablation.
    """

    capacity: int
    num_envs: int
    device: torch.device
    graph_sampling: bool

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def add(self, *args: Any, **kwargs: Any) -> None: ...  # one vector step, in the columns of its storage

    def sample(self, batch_size: int) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class GraphSampledReplay(Replay, Protocol):
    """A replay whose `graph_sample` reads only device tensors, so a CUDA graph that captures it keeps following the
    buffer as it fills."""

    def graph_sample(self, batch_size: int) -> Batch: ...


class RingStorage:
    """Named per-slot columns preallocated on the device, written a vector step (N slots) at a time; the oldest
    are overwritten once it is full.

    Subclasses allocate their columns and name them in `columns`. `filled` and `head` are `size` and `pos` on the
    device, refreshed by every write (kernel launches, no host sync), for samplers that a CUDA graph captures.
    """

    def __init__(self, capacity: int, num_envs: int, device: torch.device):
        capacity = -(-capacity // num_envs) * num_envs  # round up to whole vector steps
        self.capacity, self.num_envs, self.device = capacity, num_envs, device
        self.rows = capacity // num_envs  # vector steps held
        self.pos = 0  # next slot to write (always a row start)
        self.size = 0  # filled slots
        self.filled = torch.zeros((), dtype=torch.int64, device=device)
        self.head = torch.zeros((), dtype=torch.int64, device=device)

    def columns(self) -> dict[str, torch.Tensor]:
        """The storage's tensors by name, each with one entry per slot first."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.columns().values())

    def write(self, new: dict[str, torch.Tensor]) -> None:
        """Store one vector step, one entry per env in each column, at `pos`."""
        n, start = self.num_envs, self.pos
        width = next(iter(new.values())).shape[0]
        if width != n:
            raise ValueError(f"add expects one entry per env ({n}), got {width}")
        for name, dest in self.columns().items():
            dest[start : start + n] = new[name]
        self.pos = (start + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._refresh_fill()

    def newest_slots(self) -> torch.Tensor:
        """The slots of the last vector step written, in env order: one row of N slots, as writes fill whole rows."""
        start = (self.pos - self.num_envs) % self.capacity
        return torch.arange(start, start + self.num_envs, device=self.device)

    def _refresh_fill(self) -> None:
        """Copy the fill level and the write position to the device-side tensors that samplers read."""
        self.filled.fill_(self.size)
        self.head.fill_(self.pos)

    def state_dict(self) -> dict:
        """Filled part of the storage plus its position, for checkpoints (tensors and ints only)."""
        return {"pos": self.pos, "size": self.size, **{k: v[: self.size].clone() for k, v in self.columns().items()}}

    def load_state_dict(self, state: dict) -> None:
        size = state["size"]
        if size > self.capacity:
            raise ValueError(f"saved replay holds {size} transitions, more than this buffer's capacity {self.capacity}")
        for name, dest in self.columns().items():
            dest[:size] = state[name].to(self.device)
        self.pos, self.size = state["pos"], size
        self._refresh_fill()


class TransitionStorage(RingStorage):
    """Whole transitions: obs, action, reward, true next obs, terminated and truncated per slot. `gather` reads
    one-step transitions, or n-step returns when n_step > 1 (nstep.py)."""

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: tuple[int, ...],
        obs_dtype: torch.dtype,
        device: torch.device,
        n_step: int = 1,
        gamma: float = 0.99,
    ):
        super().__init__(capacity, num_envs, device)
        capacity = self.capacity
        self.n_step, self.gamma = n_step, gamma
        self.obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.next_obs = torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.truncated = torch.zeros(capacity, dtype=torch.float32, device=device)

    def columns(self) -> dict[str, torch.Tensor]:
        return {
            "obs": self.obs,
            "next_obs": self.next_obs,
            "actions": self.actions,
            "rewards": self.rewards,
            "terminated": self.terminated,
            "truncated": self.truncated,
        }

    def add(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_obs: torch.Tensor,
        terminated: torch.Tensor,
        truncated: torch.Tensor | None = None,
    ) -> None:
        """Store one vector step: one transition per env (leading dim num_envs), tensors already on the device.

        `truncated` (episode cut by a time limit) only matters to n-step returns, which stop there.
        """
        if truncated is None:
            truncated = torch.zeros_like(terminated)
        self.write(
            {
                "obs": obs,
                "next_obs": next_obs,
                "actions": actions,
                "rewards": rewards,
                "terminated": terminated,
                "truncated": truncated,
            }
        )

    def gather(self, idx: torch.Tensor, base: torch.Tensor | None = None) -> Batch:
        """The transitions starting at slots `idx`: one-step, or n-step returns when n_step > 1. A population's
        storage holds one ring per agent one after another (population.py): `idx` then counts inside a ring and
        `base` is the first slot of each one's ring."""
        slot = idx if base is None else idx + base
        if self.n_step == 1:
            return Batch(
                self.obs[slot], self.actions[slot], self.rewards[slot], self.next_obs[slot], self.terminated[slot]
            )
        returns, last, discounts = nstep_returns(
            self.rewards,
            self.terminated,
            self.truncated,
            idx,
            self.head,
            self.num_envs,
            self.n_step,
            self.gamma,
            self.capacity,
            base,
        )
        return Batch(self.obs[slot], self.actions[slot], returns, self.next_obs[last], self.terminated[last], discounts)

    def newest(self) -> Batch:
        """The last vector step added, one transition per env in env order (the no-replay ablation's batch)."""
        return self.gather(self.newest_slots())


class ReplayBuffer(TransitionStorage):
    """Transitions sampled uniformly, with replacement, over the filled slots."""

    def sample(self, batch_size: int) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return self.gather(idx)

    def samples(self, n: int, batch_size: int) -> Batch:
        """n samples as (n, batch_size): drawn as n calls of `sample` draw them, gathered at once."""
        idx = torch.stack([torch.randint(0, self.size, (batch_size,), device=self.device) for _ in range(n)])
        return Batch._make(
            None if t is None else t.view(n, batch_size, *t.shape[1:]) for t in self.gather(idx.view(-1))
        )

    graph_sampling = True  # the fill level and, for n-step returns, the write position are read on the device

    def graph_sample(self, batch_size: int) -> Batch:
        """A uniform sample like `sample`, drawn from the device-side fill level `filled` only."""
        idx = (torch.rand(batch_size, device=self.device) * self.filled).long()
        return self.gather(torch.minimum(idx, self.filled - 1))  # rand can round up to exactly 1.0 in float32
