"""FrameReplay add (one vector step of 16 Atari envs: 16 frames) and sample (batch 32 of 4-frame stacks)."""

from __future__ import annotations

import torch

from fastdqn.bench_suites import synchronize
from fastdqn.frame_replay import FrameReplay

ENVS, CAPACITY = 16, 4_096


def filled_frames(device: torch.device) -> tuple[FrameReplay, tuple[torch.Tensor, ...]]:
    """A full FrameReplay (random frames, no episode starts after the first row) and one vector step to add."""
    replay = FrameReplay(CAPACITY, ENVS, (84, 84), 4, device)
    frames = torch.randint(0, 256, (ENVS, 84, 84), dtype=torch.uint8, device=device)
    step = (
        frames,
        torch.zeros(ENVS, dtype=torch.int64, device=device),
        torch.ones(ENVS, device=device),
        torch.zeros(ENVS, dtype=torch.uint8, device=device),
        torch.zeros(ENVS, dtype=torch.bool, device=device),
    )
    replay.add_resets(frames)
    while len(replay) < replay.capacity:
        replay.add(*step)
    return replay, step


def test_frames_add(benchmark, device):
    replay, step = filled_frames(device)
    benchmark(lambda: (replay.add(*step), synchronize(device)))


def test_frames_sample(benchmark, device):
    replay, _ = filled_frames(device)
    benchmark(lambda: (replay.sample(32), synchronize(device)))
