"""The update runner: gradient updates on replay samples behind one interface, eager, compiled or CUDA-graphed.

`make_update_runner` picks the implementation from the learner's config:

- eager: the learner's `step_on` (autograd engine, fused Adam);
- compiled: `single_graph_step` under torch.compile, one pure function of the learner's tensors, so every learner
  in a process (bench, sweeps) shares one compiled graph instead of recompiling, and after torch's recompile
  limit silently running eager; on a CPU compiled ahead of time and stored in the compile cache, so a later run of
  the same config loads it instead of compiling (compile_cache.py);
- graphed: sampling, gather and the update (eager or compiled) captured once into a CUDA graph and replayed, one
  launch per update.

All three own the device-side metric sums (`read_metrics`, the training loop's one periodic sync), the last
update's per-sample |TD errors| and the priority updates of a prioritized replay.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from fastdqn.compile_cache import StoredSteps
from fastdqn.config import Config
from fastdqn.cuda_graph import CaptureError, capture, on_side_stream
from fastdqn.errors import ConfigError, DeviceError, FastDQNError
from fastdqn.learner import METRICS, DQNLearner, single_graph_step, targets_beforehand, updates_per_target_pass
from fastdqn.prioritized import PrioritizedReplayBuffer
from fastdqn.replay import Batch, GraphSampledReplay, Replay, ReplayBuffer, TransitionStorage

StepFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
WARMUP = 3  # uncaptured updates on a side stream before a capture (compiling, allocating the optimizer state)
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor captures its own CUDA graphs in these


def compile_mode(cfg: Config) -> str:
    """torch.compile mode of the update step; auto is inductor's default on every device (max-autotune's first
    compile can take minutes, for little gain on these small matmuls)."""
    return "default" if cfg.compile_mode == "auto" else cfg.compile_mode


@functools.cache
def compiled_graph_step(mode: str) -> Callable:
    """`single_graph_step` compiled once per mode for the whole process."""
    return torch.compile(single_graph_step, mode=mode)


@functools.cache
def stored_graph_steps(mode: str) -> StoredSteps:
    """`single_graph_step` compiled ahead of time per argument signature and kept in the compile cache (CPU)."""
    return StoredSteps(single_graph_step, mode)


def compiled_step(learner: DQNLearner) -> StepFn:
    """The shared compiled `single_graph_step` on `learner`'s tensors: on a CPU the stored one (compile_cache.py),
    which a later run of the same config loads instead of compiling; on CUDA torch.compile's, which the graphed
    runner captures.

    Called under no_grad, which torch.func's gradients ignore: the compiled step is then an inference graph,
    without the autograd wrapper around it that nothing outside would use.
    """
    mode = compile_mode(learner.cfg)
    step: Callable | None = compiled_graph_step(mode) if learner.device.type == "cuda" else None

    def run(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal step
        args = (*learner.functional_state(), *batch.loss_inputs())
        with torch.no_grad():
            if step is None:  # the first update: this learner's stored step
                step = stored_graph_steps(mode).for_args(args)
            return step(*args)

    return run


def graph_wanted(cfg: Config, device: torch.device, replay: Replay | None) -> bool:
    """Whether this run captures its update in a CUDA graph; cuda_graph=always where it cannot is a clear error."""
    if cfg.cuda_graph == "never" or (cfg.cuda_graph == "auto" and not cfg.compile):
        return False
    why_not, fix = None, "set cuda_graph to auto or never"
    error: type[FastDQNError] = ConfigError
    if device.type != "cuda":
        why_not, error = f"needs a CUDA device, this run is on {device}", DeviceError
    elif replay is None or not cfg.replay_buffer or not replay.graph_sampling:
        why_not = "covers uniform replay only (not prioritized replay or replay_buffer: false)"
    elif cfg.compile and compile_mode(cfg) in INDUCTOR_GRAPH_MODES:
        why_not = f"cannot hold compile_mode={cfg.compile_mode}, whose own CUDA graphs would nest in fastdqn's capture"
        fix = "use compile_mode default or max-autotune-no-cudagraphs, or set cuda_graph to auto or never"
    if why_not is None:
        return True
    if cfg.cuda_graph == "always":
        raise error(f"cuda_graph=always {why_not}: {fix}")
    return False


class UpdateRunner:
    """Runs gradient updates of `learner` on samples of `replay`, or on given batches, with the eager step or the
    compiled one; keeps the metric sums and the last |TD errors|, and updates a prioritized replay's priorities."""

    def __init__(self, learner: DQNLearner, replay: Replay | None = None, compiled: bool = False):
        self.learner, self.replay, self.cfg = learner, replay, learner.cfg
        self.kind = "compiled" if compiled else "eager"
        self.step_fn: StepFn = compiled_step(learner) if compiled else learner.step_on
        self.metrics_sum = torch.zeros(len(METRICS), device=learner.device)
        self.metrics_count = 0
        self.td_errors: torch.Tensor | None = None  # |TD error| per sample of the last update (device tensor)
        # the eager step on uniform replay takes a training phase's updates in chunks (`run`)
        self.chunked = (
            not compiled
            and isinstance(replay, ReplayBuffer)
            and self.cfg.replay_buffer
            and targets_beforehand(self.cfg, learner.q, learner.target_net)
        )

    def run(self, n: int) -> None:
        """`n` updates, each on a new sample. Where it can (`chunked`), in chunks of `updates_per_target_pass`: a
        chunk's samples drawn as single samples draw them and gathered at once, and their target Q-values from one
        forward pass of the target net, which only a hard copy after the phase changes. Only float rounding differs
        from updates taken one at a time."""
        if not self.chunked:
            for _ in range(n):
                self.step()
            return
        assert isinstance(self.replay, ReplayBuffer) and self.learner.target_net is not None, "checked in __init__"
        chunk, size = updates_per_target_pass(self.cfg), self.cfg.batch_size
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            batches = self.replay.samples(m, size)
            with torch.no_grad():
                next_q_target = self.learner.target_net(batches.next_obs.flatten(0, 1)).view(m, size, -1)
            for u in range(m):
                self.update(batches.at(u), next_q_target[u])

    def step(self) -> torch.Tensor:
        """One update on a new replay sample (the newest vector step in the no-replay ablation); returns its
        [loss, mean Q, grad norm] as a device tensor, valid until the next update."""
        assert self.replay is not None, "step() samples the replay the runner was given"
        if self.cfg.replay_buffer:
            return self.update(self.replay.sample(self.cfg.batch_size))
        assert isinstance(self.replay, TransitionStorage), "the no-replay ablation keeps transitions"
        return self.update(self.replay.newest())

    def update(self, batch: Batch, next_q_target: torch.Tensor | None = None) -> torch.Tensor:
        """One update on `batch` (with its target Q-values when computed beforehand: the eager step): add its
        metrics to the sums, keep its |TD errors| and give them to the replay as new priorities when the batch came
        with slot indices (prioritized replay)."""
        if next_q_target is None:
            stats, self.td_errors = self.step_fn(batch)
        else:
            stats, self.td_errors = self.learner.step_on(batch, next_q_target)
        self.metrics_sum += stats
        self.metrics_count += 1
        if batch.indices is not None:
            assert isinstance(self.replay, PrioritizedReplayBuffer), "only prioritized replay samples carry indices"
            self.replay.update_priorities(batch.indices, self.td_errors)
        return stats

    def read_metrics(self) -> dict[str, float]:
        """Mean of each metric since the last read (one device->host copy), then reset the sums in place."""
        if self.metrics_count == 0:
            return {}
        means = (self.metrics_sum / self.metrics_count).tolist()
        self.metrics_sum.zero_()
        self.metrics_count = 0
        return dict(zip(METRICS, means))


class GraphedUpdate(UpdateRunner):
    """Sampling, gather, update and metric sums as one CUDA graph, replayed for every update.

    Everything the graph touches has a fixed address: the replay storage and its device-side fill level, the
    weights, the optimizer state, the tensor learning rate and the metric sums; all are updated in place. The
    first WARMUP updates run uncaptured on a side stream, the next one captures, later ones replay. A checkpoint
    load or a rollback that replaces the optimizer state triggers a new capture. If capture fails the runner
    warns once and runs the same body uncaptured (cuda_graph=always: raises instead).
    """

    replay: GraphSampledReplay

    def __init__(self, learner: DQNLearner, replay: GraphSampledReplay, compiled: bool = False):
        super().__init__(learner, replay, compiled)
        self.chunked = False  # every update is one replay of the captured graph, which samples inside
        self.kind, self.compiled, self.device = "graphed", compiled, learner.device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.held: list[tuple[torch.Tensor, int]] = []  # what the graph uses by address, and the address
        self.captures = 0
        self.warmups = 0
        self.failed = False

    def body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph holds: a sample drawn from device tensors only, the update, the metric sums."""
        stats, td_errors = self.step_fn(self.replay.graph_sample(self.cfg.batch_size))
        self.metrics_sum += stats
        return stats, td_errors

    def step(self) -> torch.Tensor:
        """One update; its [loss, mean Q, grad norm] and `td_errors` are rewritten in place by the next one."""
        if self.graph is not None and self.replaced():
            self.graph, self.outputs, self.held = None, None, []  # a load or rollback replaced them: capture again
            self.warmups = WARMUP - 1
        if self.graph is None and not self.failed:
            if self.warmups < WARMUP:
                self.warmups += 1
                stats, self.td_errors = on_side_stream(self.body, self.device)
                self.metrics_count += 1
                return stats
            self._capture()
        if self.graph is None:
            stats, self.td_errors = self.body()
        else:
            self.graph.replay()
            assert self.outputs is not None, "captured with the graph"
            stats, self.td_errors = self.outputs
        self.metrics_count += 1
        return stats

    def _capture(self) -> None:
        try:
            self.graph, self.outputs = capture(self.body, self.device)
        except CaptureError as exc:
            if self.cfg.cuda_graph == "always":
                raise DeviceError(
                    f"CUDA graph capture of the update failed ({exc}): set cuda_graph to auto to run "
                    "it uncaptured with a warning, or never"
                ) from exc
            self.failed = True
            warnings.warn(
                f"CUDA graph capture of the update failed ({exc}); running it uncaptured. Set "
                "cuda_graph=never to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.captures += 1
        self.held = [(t, t.data_ptr()) for t in self.graph_tensors()]

    def graph_tensors(self) -> list[torch.Tensor]:
        """The learner's tensors a captured graph reads and writes by address, which a checkpoint load or a
        rollback could replace: weights and buffers of both networks, Adam's state, the learning rate."""
        learner = self.learner
        nets = (learner.q, learner.target)
        return [
            learner.lr,
            *(t for net in nets for t in (*net.parameters(), *net.buffers())),
            *(t for state in learner.optimizer.state.values() for t in state.values()),
        ]

    def replaced(self) -> bool:
        """Whether any tensor of the capture was replaced, or given new storage, since. The captured ones stay
        referenced, so their memory cannot go to a new tensor and fool the comparison."""
        now = self.graph_tensors()
        return len(now) != len(self.held) or any(
            t is not old or t.data_ptr() != ptr for t, (old, ptr) in zip(now, self.held)
        )


def make_update_runner(learner: DQNLearner, replay: Replay | None = None) -> UpdateRunner:
    """The update runner the learner's config asks for: graphed where `graph_wanted` says so, capturing the
    compiled step with `compile` and the eager one without; else compiled or eager."""
    if graph_wanted(learner.cfg, learner.device, replay):
        assert isinstance(replay, GraphSampledReplay), "graph_wanted checked graph_sampling"
        return GraphedUpdate(learner, replay, compiled=learner.cfg.compile)
    return UpdateRunner(learner, replay, compiled=learner.cfg.compile)
