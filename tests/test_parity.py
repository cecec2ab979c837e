"""Fast paths against the eager update (PITFALLS 6, 7, 10).

On the CPU `--compile` runs `single_graph_step` (torch.func gradients, functional Adam) and on CUDA the
compiled `_update_step`; both must equal eager. Each variant starts from the same weights and takes the same batches: compiled fp32 must match eager to float32
rounding (loss rtol 1e-5, weights atol 1e-6 after several steps); bf16 autocast is looser (loss rtol 2e-2)
because its matmuls round to 8 mantissa bits. The CUDA-graph variant cannot be captured on a CPU: its captured
body (device-side sampling, gather, update) is checked against eager here, and its refusal on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from fastdqn.config import Config
from fastdqn.cuda_graph import GraphedUpdate, graph_wanted, sample_indices
from fastdqn.errors import ConfigError, DeviceError
from fastdqn.learner import DQNLearner
from fastdqn.prioritized import PrioritizedReplayBuffer
from fastdqn.replay import Batch, ReplayBuffer
from fastdqn.schedules import epsilon_at, learning_rate_at
from fastdqn.staging import Staging

CPU = torch.device("cpu")
OBS_SHAPE, N_ACTIONS = (4,), 2


def small_cfg(**changes) -> Config:
    base = dict(device="cpu", hidden_sizes=[32, 32], batch_size=32, learning_rate=3e-3, lr_schedule="linear",
                lr_end=1e-4, total_steps=1_000, epsilon_decay_steps=500, max_grad_norm=1.0)
    return Config(**{**base, **changes})


def learner(cfg: Config, **changes) -> DQNLearner:
    torch.manual_seed(0)  # every variant starts from the same weights
    return DQNLearner(cfg.updated(**changes), OBS_SHAPE, N_ACTIONS, CPU)


def batches(n: int, size: int = 32) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(size, 4, generator=g), torch.randint(0, 2, (size,), generator=g),
                  torch.randn(size, generator=g), torch.randn(size, 4, generator=g),
                  (torch.rand(size, generator=g) < 0.1).float()) for _ in range(n)]


def filled_replay(capacity: int = 256) -> ReplayBuffer:
    replay = ReplayBuffer(capacity, 1, OBS_SHAPE, torch.float32, CPU)
    for b in batches(capacity // 32):
        for i in range(32):
            replay.add(b.obs[i:i + 1], b.actions[i:i + 1], b.rewards[i:i + 1], b.next_obs[i:i + 1],
                       b.terminated[i:i + 1])
    return replay


def run_updates(lrn: DQNLearner, cfg: Config, data: list[Batch]) -> list[float]:
    """One update per batch with the LR schedule moving, as in training; the losses, read at the end."""
    stats = []
    for step, batch in enumerate(data):
        lrn.set_learning_rate(learning_rate_at(cfg, step * 100))
        stats.append(lrn.update(batch))
    return [s[0].item() for s in stats]


def assert_same_weights(a: DQNLearner, b: DQNLearner, atol: float) -> None:
    for (name, p), q in zip(a.q.named_parameters(), b.q.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


@pytest.mark.slow
def test_compiled_update_matches_eager_and_never_recompiles_while_lr_and_epsilon_change(monkeypatch):
    cfg = small_cfg()
    data = batches(8)
    eager, compiled = learner(cfg), learner(cfg, compile=True)
    eager_losses = run_updates(eager, cfg, data)
    compiled_losses = run_updates(compiled, cfg, data)  # the first call compiles
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    assert_same_weights(compiled, eager, atol=1e-6)  # the LR schedule reached the compiled step unchanged
    assert compiled.optimizer.param_groups[0]["lr"] is compiled.lr

    # PITFALL 7: a changing Python float in the step would recompile (and after 8, silently run eager).
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    obs = torch.randn(4, 4)
    for step in range(100):
        compiled.set_learning_rate(learning_rate_at(cfg, step * 10))
        compiled.act(obs, epsilon_at(cfg, step * 10))
        compiled.update(data[step % len(data)])
    assert len({round(epsilon_at(cfg, s * 10), 6) for s in range(100)}) > 50  # both really changed
    assert compiled.lr.item() == pytest.approx(learning_rate_at(cfg, 990))


def test_new_learners_reuse_the_compiled_step_instead_of_recompiling(monkeypatch):
    """Sweeps, ablations and `fastdqn bench` build many learners in one process. A step compiled per learner ran
    eagerly, and slower, from the 9th on (torch's recompile limit), without an error."""
    cfg = small_cfg(compile=True)
    data = batches(2)
    first = learner(cfg)
    first.update(data[0])  # compiles (or finds this config's graph from an earlier test)
    first_weights = [p.clone() for p in first.q.parameters()]
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for seed in range(10):
        torch.manual_seed(seed)
        other = DQNLearner(cfg, OBS_SHAPE, N_ACTIONS, CPU)
        before = [p.clone() for p in other.q.parameters()]
        other.update(data[1])
        assert all(not torch.equal(a, p) for a, p in zip(before, other.q.parameters()))  # its own weights moved
    assert all(torch.equal(a, p) for a, p in zip(first_weights, first.q.parameters()))  # the shared graph wrote
    # each learner's own tensors, never the first one's


@pytest.mark.slow
def test_compiled_bf16_update_matches_eager_loosely_and_keeps_fp32_state():
    cfg = small_cfg()
    data = batches(4)
    eager, amp = learner(cfg), learner(cfg, compile=True, amp=True)
    start = torch.cat([p.detach().flatten() for p in eager.q.parameters()])
    torch.testing.assert_close(torch.tensor(run_updates(amp, cfg, data)), torch.tensor(run_updates(eager, cfg, data)),
                               rtol=2e-2, atol=2e-3)
    # Adam moves every weight by about lr per step, in the sign of its gradient, so near-zero gradients can flip
    # under bf16: compare the whole update direction instead of each weight.
    moved_eager = torch.cat([p.detach().flatten() for p in eager.q.parameters()]) - start
    moved_amp = torch.cat([p.detach().flatten() for p in amp.q.parameters()]) - start
    assert (moved_amp - moved_eager).norm() < 0.2 * moved_eager.norm()
    # PITFALL 10: bf16 needs no GradScaler; weights and Adam moments stay float32 (gradients: next test).
    for p in amp.q.parameters():
        assert p.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in amp.optimizer.state[p].values())
    assert amp.metrics_sum.dtype == torch.float32


def test_eager_bf16_loss_is_float32_and_close_to_fp32():
    cfg = small_cfg()
    batch = batches(1)[0]
    amp = learner(cfg, amp=True)
    stats_amp, td_amp = amp.step_on(batch)
    stats_fp32, td_fp32 = learner(cfg).step_on(batch)
    assert stats_amp.dtype == td_amp.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in amp.q.parameters())
    torch.testing.assert_close(stats_amp[0], stats_fp32[0], rtol=2e-2, atol=2e-3)


def test_graph_body_gives_eager_update_on_the_same_indices():
    """The captured body samples on the device; with the same random draw it is exactly the eager update."""
    cfg = small_cfg()
    replay = filled_replay()
    graphed_learner, eager = learner(cfg), learner(cfg)
    graphed = GraphedUpdate(graphed_learner, replay, cfg.batch_size)
    eager_sum = torch.zeros(3)
    for _ in range(3):
        graphed.size.fill_(len(replay))
        torch.manual_seed(7)
        stats, td_errors = graphed.sampled_update()
        torch.manual_seed(7)
        idx = sample_indices(torch.tensor(len(replay)), cfg.batch_size)
        eager_stats, eager_td = eager.step_on(replay.gather(idx))
        torch.testing.assert_close(stats, eager_stats, rtol=0, atol=0)
        torch.testing.assert_close(td_errors, eager_td, rtol=0, atol=0)
        eager_sum += eager_stats
    assert_same_weights(graphed_learner, eager, atol=0)
    torch.testing.assert_close(graphed_learner.metrics_sum, eager_sum)  # the body also adds up the metrics


def test_graph_sampler_stays_in_the_filled_slots_and_covers_them():
    size = torch.tensor(5)
    idx = torch.cat([sample_indices(size, 1000) for _ in range(5)])
    assert idx.min() == 0 and idx.max() == 4 and idx.dtype == torch.int64
    counts = torch.bincount(idx, minlength=5).float()
    assert (counts / counts.sum() - 0.2).abs().max() < 0.03  # uniform
    assert sample_indices(torch.tensor(1), 100).eq(0).all()


def test_graph_runner_on_cpu_falls_back_to_the_uncaptured_update():
    """GraphedUpdate.step on a CPU device never captures; its updates and metric counts are the eager ones."""
    cfg = small_cfg()
    replay = filled_replay()
    lrn = learner(cfg)
    graphed = GraphedUpdate(lrn, replay, cfg.batch_size)
    graphed.failed = True  # what a failed capture leaves behind
    before = [p.clone() for p in lrn.q.parameters()]
    graphed.step()
    graphed.step()
    assert lrn.metrics_count == 2 and lrn.td_errors.shape == (cfg.batch_size,)
    assert any(not torch.equal(a, b) for a, b in zip(before, lrn.q.parameters()))
    assert set(lrn.read_metrics()) == {"loss", "q_mean", "grad_norm"}


def test_cuda_graph_choice_refuses_clearly_where_it_cannot_run():
    replay = filled_replay()
    assert not graph_wanted(small_cfg(compile=True), CPU, replay)  # auto: only on CUDA
    assert not graph_wanted(small_cfg(cuda_graph="never"), CPU, replay)
    with pytest.raises(DeviceError, match="cuda_graph=always needs a CUDA device.*auto or never"):
        graph_wanted(small_cfg(cuda_graph="always"), CPU, replay)
    cuda = torch.device("cuda")  # only inspected, never used
    assert graph_wanted(small_cfg(compile=True), cuda, replay)
    assert not graph_wanted(small_cfg(), cuda, replay)  # auto without compile
    per = PrioritizedReplayBuffer(64, 1, OBS_SHAPE, torch.float32, CPU, 1, 0.99, 0.6, 1e-6)
    assert not graph_wanted(small_cfg(compile=True, prioritized=True), cuda, per)
    with pytest.raises(ConfigError, match="uniform one-step replay only"):
        graph_wanted(small_cfg(cuda_graph="always", prioritized=True), cuda, per)


def test_staging_on_cpu_converts_dtypes_and_returns_actions():
    import numpy as np

    staging = Staging(CPU)
    rewards = staging.to_device("rewards", np.array([1.5, -2.0]), torch.float32)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.5, -2.0]
    flags = staging.to_device("terminated", np.array([True, False]), torch.float32)
    assert flags.tolist() == [1.0, 0.0]
    obs = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert torch.equal(staging.to_device("obs", obs), torch.from_numpy(obs))
    actions = staging.to_host("actions", torch.tensor([1, 0]))
    assert isinstance(actions, np.ndarray) and actions.tolist() == [1, 0]
