"""Fast paths against the eager update: compiled, bf16 and the CUDA-graph runner's logic.

`--compile` runs `single_graph_step` (torch.func gradients, functional Adam) on every device; it must equal eager.
Each variant starts from the same weights and takes the same batches: compiled fp32 must match eager to float32
rounding (loss rtol 1e-5, weights atol 1e-6 after several steps); bf16 autocast is looser (loss rtol 2e-2)
because its matmuls round to 8 mantissa bits. A CUDA graph cannot be captured on a CPU: here the graphed runner's
body (device-side sampling, gather, update) is checked against eager, and its warm-up / capture / recapture /
fallback logic runs with a stand-in for the capture that, like a graph, rewrites fixed output tensors in place.
The real captures are in test_cuda.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compile_checks import assert_compiled
from fastdqn import learner as learner_module
from fastdqn import update_runner
from fastdqn.config import Config
from fastdqn.cuda_graph import CaptureError
from fastdqn.errors import ConfigError, DeviceError
from fastdqn.learner import METRICS, DQNLearner
from fastdqn.prioritized import PrioritizedReplayBuffer
from fastdqn.replay import Batch, ReplayBuffer
from fastdqn.schedules import epsilon_at, learning_rate_at
from fastdqn.update_runner import WARMUP, GraphedUpdate, UpdateRunner, graph_wanted, make_update_runner

CPU = torch.device("cpu")
OBS_SHAPE, N_ACTIONS = (4,), 2


def small_cfg(**changes) -> Config:
    base = dict(
        device="cpu",
        hidden_sizes=[32, 32],
        batch_size=32,
        learning_rate=3e-3,
        lr_schedule="linear",
        lr_end=1e-4,
        total_steps=1_000,
        epsilon_decay_steps=500,
        max_grad_norm=1.0,
    )
    return Config(**{**base, **changes})


def learner(cfg: Config, **changes) -> DQNLearner:
    torch.manual_seed(0)  # every variant starts from the same weights
    return DQNLearner(cfg.updated(**changes), OBS_SHAPE, N_ACTIONS, CPU)


def batches(n: int, size: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [
        Batch(
            torch.randn(size, 4, generator=g),
            torch.randint(0, 2, (size,), generator=g),
            torch.randn(size, generator=g),
            torch.randn(size, 4, generator=g),
            (torch.rand(size, generator=g) < 0.1).float(),
        )
        for _ in range(n)
    ]


def filled_replay(capacity: int = 256) -> ReplayBuffer:
    replay = ReplayBuffer(capacity, 1, OBS_SHAPE, torch.float32, CPU)
    for b in batches(capacity // 32):
        for i in range(32):
            replay.add(
                b.obs[i : i + 1],
                b.actions[i : i + 1],
                b.rewards[i : i + 1],
                b.next_obs[i : i + 1],
                b.terminated[i : i + 1],
            )
    return replay


def run_updates(lrn: DQNLearner, cfg: Config, data: list[Batch]) -> list[float]:
    """One update per batch with the LR schedule moving, as in training; the losses, read at the end."""
    runner = make_update_runner(lrn)
    stats = []
    for step, batch in enumerate(data):
        lrn.set_learning_rate(learning_rate_at(cfg, step * 100))
        stats.append(runner.update(batch))
    return [s[0].item() for s in stats]


def assert_same_weights(a: DQNLearner, b: DQNLearner, atol: float) -> None:
    for (name, p), q in zip(a.q.named_parameters(), b.q.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


@pytest.mark.slow
def test_compiled_update_matches_eager_and_never_recompiles_while_lr_and_epsilon_change():
    cfg = small_cfg()
    data = batches(8)
    eager, compiled, constant_lr = learner(cfg), learner(cfg, compile=True), learner(cfg)
    eager_losses = run_updates(eager, cfg, data)
    constant_runner = make_update_runner(constant_lr)
    for batch in data:
        constant_runner.update(batch)
    # the schedule matters on these batches, so equal weights below mean the compiled step followed it
    assert (
        torch.cat([p.flatten() for p in constant_lr.q.parameters()])
        - torch.cat([p.flatten() for p in eager.q.parameters()])
    ).abs().max() > 1e-4
    # A changing Python float in the step would recompile (and after 8, silently run eager).
    with assert_compiled():
        compiled_losses = run_updates(compiled, cfg, data)  # the first call compiles
        torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
        assert_same_weights(compiled, eager, atol=1e-6)  # the LR schedule reached the compiled step unchanged
        obs = torch.randn(4, 4)
        runner = make_update_runner(compiled)
        for step in range(100):
            compiled.set_learning_rate(learning_rate_at(cfg, step * 10))
            compiled.act(obs, epsilon_at(cfg, step * 10))
            runner.update(data[step % len(data)])
    assert len({round(epsilon_at(cfg, s * 10), 6) for s in range(100)}) > 50  # both really changed
    assert len({learning_rate_at(cfg, s * 10) for s in range(100)}) > 50


def test_new_learners_reuse_the_compiled_step_instead_of_recompiling():
    """Sweeps, ablations and `fastdqn bench` build many learners in one process. A step compiled per learner ran
    eagerly, and slower, from the 9th on (torch's recompile limit), without an error."""
    cfg = small_cfg(compile=True)
    data = batches(2)
    first = learner(cfg)
    with assert_compiled():
        make_update_runner(first).update(data[0])  # compiles
        first_weights = [p.clone() for p in first.q.parameters()]
        for seed in range(10):
            torch.manual_seed(seed)
            other = DQNLearner(cfg, OBS_SHAPE, N_ACTIONS, CPU)
            before = [p.clone() for p in other.q.parameters()]
            make_update_runner(other).update(data[1])
            assert all(not torch.equal(a, p) for a, p in zip(before, other.q.parameters()))  # its own weights moved
    assert all(torch.equal(a, p) for a, p in zip(first_weights, first.q.parameters()))  # the shared graph wrote
    # each learner's own tensors, never the first one's


@pytest.mark.slow
def test_compiled_bf16_update_matches_eager_loosely_and_keeps_fp32_state():
    cfg = small_cfg()
    data = batches(4)
    eager, amp = learner(cfg), learner(cfg, compile=True, amp=True)
    start = torch.cat([p.detach().flatten() for p in eager.q.parameters()])
    with assert_compiled():
        amp_losses = run_updates(amp, cfg, data)
    torch.testing.assert_close(
        torch.tensor(amp_losses), torch.tensor(run_updates(eager, cfg, data)), rtol=2e-2, atol=2e-3
    )
    # Adam moves every weight by about lr per step, in the sign of its gradient, so near-zero gradients can flip
    # under bf16: compare the whole update direction instead of each weight.
    moved_eager = torch.cat([p.detach().flatten() for p in eager.q.parameters()]) - start
    moved_amp = torch.cat([p.detach().flatten() for p in amp.q.parameters()]) - start
    assert (moved_amp - moved_eager).norm() < 0.2 * moved_eager.norm()
    # bf16 has float32's exponent range, so it needs no GradScaler; weights and Adam moments stay float32
    # (gradients: next test).
    for p in amp.q.parameters():
        assert p.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in amp.optimizer.state[p].values())
    assert make_update_runner(amp).metrics_sum.dtype == torch.float32


def test_eager_bf16_loss_is_float32_and_close_to_fp32():
    cfg = small_cfg()
    batch = batches(1)[0]
    amp = learner(cfg, amp=True)
    stats_amp, td_amp = amp.step_on(batch)
    stats_fp32, td_fp32 = learner(cfg).step_on(batch)
    assert stats_amp.dtype == td_amp.dtype == torch.float32
    # what the optimizer saw (the MLP's gradients are taken by hand and never stored in .grad): float32
    assert all(v.dtype == torch.float32 for p in amp.q.parameters() for v in amp.optimizer.state[p].values())
    torch.testing.assert_close(stats_amp[0], stats_fp32[0], rtol=2e-2, atol=2e-3)


def test_graph_body_gives_eager_update_on_the_same_indices():
    """The captured body samples from device tensors; with the same random draw it is exactly the eager update."""
    cfg = small_cfg()
    replay = filled_replay()
    graphed_learner, eager = learner(cfg), learner(cfg)
    graphed = GraphedUpdate(graphed_learner, replay)
    eager_sum = torch.zeros(3)
    for _ in range(3):
        torch.manual_seed(7)
        stats, td_errors = graphed.body()
        torch.manual_seed(7)
        eager_stats, eager_td = eager.step_on(replay.graph_sample(cfg.batch_size))
        torch.testing.assert_close(stats, eager_stats, rtol=0, atol=0)
        torch.testing.assert_close(td_errors, eager_td, rtol=0, atol=0)
        eager_sum += eager_stats
    assert_same_weights(graphed_learner, eager, atol=0)
    torch.testing.assert_close(graphed.metrics_sum, eager_sum)  # the body also adds up the metrics


class StandInGraph:
    """What a CUDA graph does, on the CPU: capturing runs nothing and hands out fixed output tensors; each replay
    runs the body and writes its results into those tensors in place (a real replay does not run the Python)."""

    def __init__(self, fn):
        self.fn = fn
        self.outputs = (torch.full((3,), float("nan")), torch.full((small_cfg().batch_size,), float("nan")))

    def replay(self) -> None:
        for out, new in zip(self.outputs, self.fn()):
            out.copy_(new)


@pytest.fixture
def stand_in_capture(monkeypatch):
    """GraphedUpdate on the CPU with a stand-in capture; the list collects one entry per capture."""
    captures = []

    def capture(fn, device):
        captures.append(device)
        graph = StandInGraph(fn)
        return graph, graph.outputs

    monkeypatch.setattr(update_runner, "capture", capture)
    monkeypatch.setattr(update_runner, "on_side_stream", lambda fn, device: fn())
    return captures


def test_graphed_runner_warms_up_captures_once_and_replays_like_eager(stand_in_capture):
    """Warm-up, capture, replay: the same updates, metric sums and TD errors as the eager runner, with the LR
    schedule moving; the outputs it returns are the graph's fixed tensors, rewritten by each replay."""
    cfg = small_cfg()
    replay = filled_replay()
    graphed = GraphedUpdate(learner(cfg), replay)
    eager = UpdateRunner(learner(cfg), replay)
    outputs = set()
    for step in range(12):
        for runner in (graphed, eager):
            runner.learner.set_learning_rate(learning_rate_at(cfg, step * 100))
        torch.manual_seed(step)
        stats = graphed.step().clone()
        torch.manual_seed(step)
        eager_stats = eager.update(replay.graph_sample(cfg.batch_size))  # the eager runner on the same draw
        torch.testing.assert_close(stats, eager_stats, rtol=0, atol=0)
        torch.testing.assert_close(graphed.td_errors, eager.td_errors, rtol=0, atol=0)
        if step >= WARMUP:
            outputs.add(graphed.td_errors.data_ptr())
    assert len(stand_in_capture) == graphed.captures == 1 and graphed.kind == "graphed"
    assert len(outputs) == 1  # replays rewrite the captured output in place: read it before the next update
    assert graphed.metrics_count == 12
    assert graphed.read_metrics() == pytest.approx(dict(zip(METRICS, (eager.metrics_sum / 12).tolist())), rel=1e-6)
    assert_same_weights(graphed.learner, eager.learner, atol=0)


def test_graphed_runner_captures_again_after_a_checkpoint_load(stand_in_capture):
    """A load replaces Adam's state tensors, which the old graph would go on writing: the runner notices and
    captures again (after one warm-up), and the loaded state is what it trains from."""
    cfg = small_cfg()
    replay = filled_replay()
    graphed = GraphedUpdate(learner(cfg), replay)
    graphed.run(WARMUP + 3)
    saved = copy.deepcopy(graphed.learner.state_dict())
    graphed.run(3)
    graphed.learner.load_state_dict(saved)
    loaded_moments = [st["exp_avg"] for st in graphed.learner.optimizer.state.values()]
    before = [m.clone() for m in loaded_moments]
    graphed.run(3)
    assert len(stand_in_capture) == graphed.captures == 2
    assert all(not torch.equal(m, b) for m, b in zip(loaded_moments, before))  # the new graph trains the loaded state


def test_graphed_runner_captures_again_when_a_weight_gets_new_storage(stand_in_capture):
    """Not only new tensor objects: a parameter given new storage in place (`p.data = ...`) leaves the graph
    writing the old memory."""
    graphed = GraphedUpdate(learner(small_cfg()), filled_replay())
    graphed.run(WARMUP + 2)
    weight = next(graphed.learner.q.parameters())
    graphed.run(2)
    assert graphed.captures == 1
    weight.data = weight.data.clone()
    graphed.run(WARMUP + 1)
    assert graphed.captures == 2


def test_graphed_runner_runs_uncaptured_with_one_warning_when_capture_fails(monkeypatch):
    """A failed capture (restored stream and generator are cuda_graph.capture's job) leaves a runner that computes
    the same updates uncaptured; with cuda_graph=always it is a one-line error naming the fix."""

    def failing_capture(fn, device):
        raise CaptureError("operation not permitted when stream is capturing")

    monkeypatch.setattr(update_runner, "capture", failing_capture)
    monkeypatch.setattr(update_runner, "on_side_stream", lambda fn, device: fn())
    cfg = small_cfg()
    replay = filled_replay()
    graphed, eager = GraphedUpdate(learner(cfg), replay), UpdateRunner(learner(cfg), replay)
    with pytest.warns(RuntimeWarning, match="capture of the update failed.*running it uncaptured") as warned:
        for step in range(WARMUP + 4):
            torch.manual_seed(step)
            stats = graphed.step()
            torch.manual_seed(step)
            torch.testing.assert_close(stats, eager.update(replay.graph_sample(cfg.batch_size)), rtol=0, atol=0)
    assert len(warned) == 1 and graphed.failed and graphed.captures == 0
    assert graphed.metrics_count == WARMUP + 4 and graphed.td_errors.shape == (cfg.batch_size,)
    strict = GraphedUpdate(learner(cfg, cuda_graph="always"), replay)
    with pytest.raises(DeviceError, match="capture of the update failed.*set cuda_graph to auto.*or never"):
        strict.run(WARMUP + 1)


def test_runner_updates_priorities_of_the_sampled_slots():
    cfg = small_cfg(prioritized=True)
    replay = PrioritizedReplayBuffer(64, 1, OBS_SHAPE, torch.float32, CPU, 1, 0.99, 0.6, 1e-6)
    for b in batches(2):
        for i in range(32):
            replay.add(
                b.obs[i : i + 1],
                b.actions[i : i + 1],
                b.rewards[i : i + 1],
                b.next_obs[i : i + 1],
                b.terminated[i : i + 1],
            )
    runner = make_update_runner(learner(cfg), replay)
    assert runner.kind == "eager"
    torch.manual_seed(0)
    batch = replay.sample(cfg.batch_size)
    torch.manual_seed(0)
    runner.step()
    expected = (runner.td_errors + replay.eps) ** replay.alpha
    last = {int(i): k for k, i in enumerate(batch.indices)}  # a slot drawn twice keeps its last value
    for slot, k in last.items():
        assert replay.priorities[slot].item() == pytest.approx(expected[k].item(), rel=1e-6)
    assert replay.priorities.unique().numel() > 10


def test_cuda_graph_choice_refuses_clearly_where_it_cannot_run():
    replay = filled_replay()
    assert not graph_wanted(small_cfg(compile=True), CPU, replay)  # auto: only on CUDA
    assert not graph_wanted(small_cfg(cuda_graph="never"), CPU, replay)
    with pytest.raises(DeviceError, match="cuda_graph=always needs a CUDA device.*auto or never"):
        graph_wanted(small_cfg(cuda_graph="always"), CPU, replay)
    cuda = torch.device("cuda")  # only inspected, never used
    assert graph_wanted(small_cfg(compile=True), cuda, replay)
    assert not graph_wanted(small_cfg(), cuda, replay)  # auto without compile
    assert graph_wanted(small_cfg(cuda_graph="always"), cuda, replay)  # the eager step, captured
    per = PrioritizedReplayBuffer(64, 1, OBS_SHAPE, torch.float32, CPU, 1, 0.99, 0.6, 1e-6)
    assert not graph_wanted(small_cfg(compile=True, prioritized=True), cuda, per)
    with pytest.raises(ConfigError, match="uniform replay only"):
        graph_wanted(small_cfg(cuda_graph="always", prioritized=True), cuda, per)
    nstep = ReplayBuffer(64, 1, OBS_SHAPE, torch.float32, CPU, n_step=3)
    assert graph_wanted(small_cfg(compile=True, n_step=3), cuda, nstep)  # n-step reads the write head on the device
    # inductor's own CUDA graphs (reduce-overhead, max-autotune) cannot nest inside fastdqn's capture
    for mode in ("reduce-overhead", "max-autotune"):
        assert not graph_wanted(small_cfg(compile=True, compile_mode=mode), cuda, replay)
        with pytest.raises(ConfigError, match=f"compile_mode={mode}.*nest.*use compile_mode default"):
            graph_wanted(small_cfg(compile=True, compile_mode=mode, cuda_graph="always"), cuda, replay)
    assert graph_wanted(small_cfg(compile=True, compile_mode="max-autotune-no-cudagraphs"), cuda, replay)


def test_factory_picks_the_runner_from_the_config():
    replay = filled_replay()
    assert make_update_runner(learner(small_cfg()), replay).kind == "eager"
    assert make_update_runner(learner(small_cfg(compile=True)), replay).kind == "compiled"
    assert update_runner.compile_mode(small_cfg()) == "default"  # auto: no minutes-long autotuning


def test_read_metrics_returns_the_mean_since_the_last_read():
    runner = UpdateRunner(learner(small_cfg()))
    data = batches(6)
    assert runner.read_metrics() == {}
    stats = torch.stack([runner.update(batch) for batch in data[:5]])
    metrics = runner.read_metrics()
    assert list(metrics) == list(METRICS)
    assert [metrics[k] for k in METRICS] == pytest.approx(stats.mean(0).tolist(), rel=1e-6)
    assert metrics["grad_norm"] > 0
    assert runner.read_metrics() == {}  # the sums were reset
    one = runner.update(data[5])
    assert runner.read_metrics()["loss"] == pytest.approx(one[0].item(), rel=1e-6)


def test_eager_runner_takes_a_phase_in_chunks_as_one_update_at_a_time(monkeypatch):
    """With hand gradients and a hard target copy the eager runner takes a phase's updates in chunks (here of 3):
    their samples gathered at once, their target Q-values from one forward pass of the target net. The same draws,
    metrics and weights as one update at a time, to float rounding."""
    monkeypatch.setattr(learner_module, "TARGET_PASS_FLOATS", 3 * 32 * 32)  # batch 32, widest layer 32
    cfg = small_cfg()
    replay = filled_replay()
    chunked, single = UpdateRunner(learner(cfg), replay), UpdateRunner(learner(cfg), replay)
    assert chunked.chunked
    single.chunked = False
    rows = []
    assert chunked.learner.target_net is not None
    chunked.learner.target_net.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    torch.manual_seed(3)
    chunked.run(7)
    draws_after = torch.get_rng_state()
    torch.manual_seed(3)
    single.run(7)
    assert torch.equal(draws_after, torch.get_rng_state())  # the same draws, in the same order
    torch.testing.assert_close(chunked.metrics_sum, single.metrics_sum, rtol=1e-5, atol=1e-6)
    assert_same_weights(chunked.learner, single.learner, atol=1e-5)
    assert rows == [3 * 32, 3 * 32, 32]  # one target pass per chunk
    # where the target moves every update, or the step is compiled or samples by priority: one at a time
    assert not UpdateRunner(learner(cfg, target_update="soft"), replay).chunked
    assert not UpdateRunner(learner(cfg), replay, compiled=True).chunked
    per = PrioritizedReplayBuffer(64, 1, OBS_SHAPE, torch.float32, CPU, 1, 0.99, 0.6, 1e-6)
    assert not UpdateRunner(learner(cfg, prioritized=True), per).chunked
