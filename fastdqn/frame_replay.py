"""A replay for frame-stack observations that stores each frame once, as uint8 on the training device.

`FrameStorage` uses the ring layout of replay.py: slot `k * N + e` belongs to env `e` at vector step `k`,
and the same env's next vector step is N slots later. The pixel envs autoreset in NEXT_STEP mode (the step
after an episode end returns the reset observation and ignores the action), so every vector step yields
exactly one new frame per env, the true final frame included. A slot keeps

    frame       the newest frame of the observation the env returned at that vector step  (84*84 bytes)
    action, reward, terminated    of the transition that led to that observation          (8 + 4 + 1 bytes)
    start       that observation is a reset observation: it begins an episode and ends no transition  (1 byte)

The transition ending at slot s has next obs = the frames at s-(C-1)N, ..., s-N, s and obs = the frames at
s-CN, ..., s-N (C = frame_stack): both stacks are gathered at sample time with one tensor index. Frames
older than the episode's start slot are zero, which is what the envs' own frame stacks hold after a reset,
so a stack never mixes two episodes; the env index never changes within a stack, so it never mixes two envs.
Rows (vector steps) whose stack would reach into storage already overwritten are never sampled: `FrameReplay`
samples only the valid transitions, with device tensors alone, so a CUDA graph can capture its sampling.
"""

from __future__ import annotations

import torch

from fastdqn.errors import ConfigError
from fastdqn.replay import Batch, RingStorage

CANDIDATES = 4  # draws per sampled transition; the first valid one is taken (see `sample`)
NEIGHBOURS = (1, -1, 2, -2)  # rows tried around the first draw when all CANDIDATES are episode starts


class FrameStorage(RingStorage):
    """Single frames plus per-slot metadata in the ring layout; `gather` rebuilds the frame stacks."""

    def __init__(
        self, capacity: int, num_envs: int, frame_shape: tuple[int, ...], frame_stack: int, device: torch.device
    ):
        super().__init__(capacity, num_envs, device)
        capacity, self.stack = self.capacity, frame_stack
        if self.rows < frame_stack + 2:
            raise ConfigError(
                f"buffer_size {capacity} holds {self.rows} vector steps of {num_envs} envs; a frame "
                f"stack of {frame_stack} needs at least {frame_stack + 2}: raise buffer_size to "
                f">= {(frame_stack + 2) * num_envs}"
            )
        # One spare all-zero frame after the ring: padded stack positions index it, so no masking is needed.
        self.frames = torch.zeros((capacity + 1, *frame_shape), dtype=torch.uint8, device=device)
        self.actions = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.uint8, device=device)
        self.starts = torch.zeros(capacity, dtype=torch.bool, device=device)
        # [oldest physical row, lowest sampleable logical row, filled rows] on the device, refreshed by every write
        # and load: sampling reads only device tensors, so a captured CUDA graph of it follows the buffer as it fills.
        self.bounds = torch.zeros(3, dtype=torch.int64, device=device)

    def columns(self) -> dict[str, torch.Tensor]:
        return {
            "frames": self.frames,
            "actions": self.actions,
            "rewards": self.rewards,
            "terminated": self.terminated,
            "starts": self.starts,
        }

    # --- writing ----------------------------------------------------------------------------------------
    def add(
        self,
        frames: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        terminated: torch.Tensor,
        starts: torch.Tensor,
    ) -> None:
        """Store one vector step: each env's newest frame and the transition that produced it (device tensors).

        `starts[e]` marks a reset observation: its slot begins an episode and holds no transition.
        """
        self.write(
            {"frames": frames, "actions": actions, "rewards": rewards, "terminated": terminated, "starts": starts}
        )

    def add_resets(self, frames: torch.Tensor) -> None:
        """Store the newest frames of freshly reset observations (after `envs.reset()`): episode starts only."""
        n = self.num_envs
        zeros = torch.zeros(n, dtype=torch.int64, device=self.device)
        self.add(
            frames, zeros, zeros.float(), zeros.to(torch.uint8), torch.ones(n, dtype=torch.bool, device=self.device)
        )

    def _refresh_fill(self) -> None:
        super()._refresh_fill()
        for i, value in enumerate(self.row_bounds()):  # three scalar fills: kernel launches, no host sync
            self.bounds[i].fill_(value)

    # --- reading ----------------------------------------------------------------------------------------
    def row_bounds(self) -> tuple[int, int, int]:
        """(oldest physical row, lowest sampleable logical row, filled rows); logical rows count from the oldest."""
        filled = self.size // self.num_envs
        oldest = (self.pos // self.num_envs - filled) % self.rows
        # Full: the oldest `stack` rows' obs stacks may reach rows already overwritten. Not full: row 0 is the
        # first reset (all starts), so every stack is cut at it; only that row itself holds no transition.
        low = self.stack if self.size == self.capacity else 1
        return oldest, low, filled

    def slots(self, logical_rows: torch.Tensor, envs: torch.Tensor, oldest: torch.Tensor) -> torch.Tensor:
        """The slots of envs `envs` at logical rows `logical_rows` (any integer: taken modulo the rows)."""
        return ((logical_rows + oldest) % self.rows) * self.num_envs + envs

    def gather(self, last: torch.Tensor) -> Batch:
        """The transitions ending at slots `last`, whose logical rows are >= 1 (>= stack when full)."""
        c, n = self.stack, self.num_envs
        offsets = torch.arange(-c, 1, device=self.device)  # rows j-C .. j: obs is [0:C], next obs is [1:C+1]
        slots = ((last.unsqueeze(1) // n + offsets) % self.rows) * n + (last % n).unsqueeze(1)  # (B, C+1)
        # Keep the frame at row j-C+k only if no episode starts in rows j-C+k+1 .. j-1: older frames are zero.
        starts = self.starts[slots[:, :c]].to(torch.int32)  # rows j-C .. j-1
        later_starts = starts.flip(1).cumsum(1).flip(1)  # [k] = starts in rows j-C+k .. j-1
        pad = torch.zeros((last.shape[0], 2), dtype=torch.int32, device=self.device)
        keep = torch.cat([later_starts[:, 1:], pad], dim=1) == 0  # (B, C+1)
        frames = self.frames[torch.where(keep, slots, self.capacity)]  # (B, C+1, H, W); index capacity is zeros
        return Batch(
            frames[:, :c], self.actions[last], self.rewards[last], frames[:, 1:], self.terminated[last].float()
        )


class FrameReplay(FrameStorage):
    """Frame stacks sampled uniformly (with replacement) over the valid transitions, on the device."""

    graph_sampling = True  # `sample` reads only device tensors (`bounds`, `starts`)

    def __init__(
        self, capacity: int, num_envs: int, frame_shape: tuple[int, ...], frame_stack: int, device: torch.device
    ):
        super().__init__(capacity, num_envs, frame_shape, frame_stack, device)
        self.near = torch.tensor(NEIGHBOURS, dtype=torch.int64, device=device)

    def sample(self, batch_size: int) -> Batch:
        """Start slots hold no transition. Each sample draws CANDIDATES (row, env) pairs and keeps the first that is
        not a start. If all are starts (probability (starts/slots)^CANDIDATES, about 1e-12 for Atari episodes)
        it takes the nearest transition of the first candidate's env within NEIGHBOURS rows: a start is next to
        a transition (the terminal step before it, or the first step after it; a resume can put two starts in a
        row, never three). No host sync, no Python loop over the batch, only device tensors (CUDA-graph safe).
        """
        _, low_now, filled_now = self.row_bounds()
        if filled_now <= low_now:
            raise ValueError(f"frame replay holds {filled_now} vector steps; sampling needs more than {low_now}")
        oldest, low, filled = self.bounds
        shape = (batch_size, CANDIDATES)
        rows = low + (torch.rand(shape, device=self.device) * (filled - low)).long()
        rows = torch.minimum(rows, filled - 1)  # rand can round up to exactly 1.0 in float32
        envs = torch.randint(0, self.num_envs, shape, device=self.device)
        rows = torch.cat([rows, rows[:, :1] + self.near], dim=1)
        envs = torch.cat([envs, envs[:, :1].expand(-1, len(NEIGHBOURS))], dim=1)
        slots = self.slots(rows, envs, oldest)
        ok = (rows >= low) & (rows < filled) & ~self.starts[slots]
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first valid candidate
        return self.gather(slots.gather(1, first).squeeze(1))

    def graph_sample(self, batch_size: int) -> Batch:
        return self.sample(batch_size)
