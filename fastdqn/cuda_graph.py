"""The whole update as one CUDA graph: sample indices, gather from replay, TD targets, loss, backward, Adam
(capturable), soft target update and metric sums, captured once and replayed for every later update.

Everything the graph touches has a fixed address: the replay storage (preallocated), the networks' weights, the
optimizer state, the tensor learning rate and the metric sums. The one value that changes between updates, the
replay's fill level, is copied into a device tensor before each replay, so the captured sampler always draws from
the filled slots (FrameReplay keeps its own device-side bounds, refreshed by every add). The first `WARMUP` calls run on a side stream (compiling, allocating the optimizer state) and
are real updates; the next call captures, then replays. Where capture fails the runner warns once and falls back
to the uncaptured step, which computes exactly the same thing.
"""

from __future__ import annotations

import warnings

import torch

from fastdqn.config import Config
from fastdqn.errors import ConfigError, DeviceError
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner
from fastdqn.replay import ReplayBuffer

WARMUP = 3


def sample_indices(size: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Uniform slot indices in [0, size) drawn from a device tensor `size`, so a captured graph follows the fill."""
    idx = (torch.rand(batch_size, device=size.device) * size).long()
    return torch.minimum(idx, size - 1)  # rand can round up to exactly 1.0 in float32


def graph_wanted(cfg: Config, device: torch.device, replay: ReplayBuffer) -> bool:
    """Whether this run captures its update; cuda_graph=always where it cannot is a clear error."""
    if cfg.cuda_graph == "never" or (cfg.cuda_graph == "auto" and not cfg.compile):
        return False
    why_not = None
    if device.type != "cuda":
        why_not = f"needs a CUDA device, this run is on {device}"
    elif not (isinstance(replay, FrameReplay) or type(replay) is ReplayBuffer and replay.n_step == 1) \
            or not cfg.replay_buffer:
        why_not = "covers uniform one-step replay only (not prioritized, n_step > 1 or no replay)"
    if why_not is None:
        return True
    if cfg.cuda_graph == "always":
        error = DeviceError if device.type != "cuda" else ConfigError
        raise error(f"cuda_graph=always {why_not}: set cuda_graph to auto or never")
    return False


class GraphedUpdate:
    """Runs `learner`'s update on uniform samples of `replay` as one replayed CUDA graph (see module doc)."""

    def __init__(self, learner: DQNLearner, replay: ReplayBuffer, batch_size: int):
        self.learner, self.replay, self.batch_size = learner, replay, batch_size
        self.size = torch.zeros((), dtype=torch.int64, device=replay.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state_ids: tuple[int, ...] = ()
        self.warmups = 0
        self.failed = False

    def sampled_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample, gather, update and add the metrics to the learner's sums: the body that is captured."""
        if isinstance(self.replay, FrameReplay):  # samples from its own device-side bounds
            batch = self.replay.sample(self.batch_size)
        else:
            batch = self.replay.gather(sample_indices(self.size, self.batch_size))
        stats, td_errors = self.learner.step_on(batch)
        self.learner.metrics_sum += stats
        return stats, td_errors

    def step(self) -> torch.Tensor:
        """One update; returns its [loss, mean Q, grad norm] (a device tensor, overwritten by the next update)."""
        self.size.fill_(len(self.replay))
        if self.graph is not None and self._optimizer_state_ids() != self.state_ids:
            self.graph = None  # a checkpoint or rollback replaced the optimizer state: capture again
            self.warmups = WARMUP - 1
        if self.failed:
            stats, td_errors = self.sampled_update()
        elif self.graph is None and self.warmups < WARMUP:
            stats, td_errors = self._warmup()
        else:
            if self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
                stats, td_errors = self.outputs
            else:
                stats, td_errors = self.sampled_update()
        self.learner.metrics_count += 1
        self.learner.td_errors = td_errors
        return stats

    def _warmup(self) -> tuple[torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream(self.replay.device)
        side.wait_stream(torch.cuda.current_stream(self.replay.device))
        with torch.cuda.stream(side):
            out = self.sampled_update()
        torch.cuda.current_stream(self.replay.device).wait_stream(side)
        self.warmups += 1
        return out

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.sampled_update()
        except RuntimeError as exc:
            self.failed = True
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            warnings.warn(f"CUDA graph capture of the update failed ({first}); running it uncaptured. "
                          "Set cuda_graph=never to skip the attempt.", RuntimeWarning, stacklevel=3)
            return
        self.graph = graph
        self.state_ids = self._optimizer_state_ids()

    def _optimizer_state_ids(self) -> tuple[int, ...]:
        """Identity of the optimizer's state tensors, which the captured graph reads and writes in place."""
        return tuple(id(t) for state in self.learner.optimizer.state.values() for t in state.values())
