"""On a CUDA GPU: the CUDA-graph, compiled and bf16 update runners against eager, and what first contact with a
GPU tends to break (`pytest -m cuda`; skipped without CUDA).

Captured and eager runners take identical random draws (the CUDA generator is reseeded before each update), so
they must agree to float32 rounding; compiled and bf16 steps are held to the same bounds as on the CPU. Compiled
tests use compile_mode default (max-autotune's first compile can take minutes) and share one network shape and
config, so the whole file compiles the update twice (fp32 and bf16).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch

from fastdqn.config import Config
from fastdqn.cuda_graph import CaptureError, capture
from fastdqn.devices import resolve_device, use_device
from fastdqn.frame_replay import FrameReplay
from fastdqn.learner import DQNLearner, single_graph_step
from fastdqn.memory import free_bytes
from fastdqn.replay import ReplayBuffer
from fastdqn.schedules import epsilon_at, learning_rate_at
from fastdqn.staging import Staging
from fastdqn.trainer import Trainer
from fastdqn.update_runner import WARMUP, GraphedUpdate, UpdateRunner, make_update_runner

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The network, batch and config of the CartPole learning test below, so that all compiled tests share its graph.
CFG = Config(
    device="cuda",
    hidden_sizes=[64, 64],
    batch_size=128,
    learning_rate=3e-3,
    lr_schedule="linear",
    lr_end=1e-4,
    total_steps=10_000,
    epsilon_decay_steps=5_000,
    compile_mode="default",
)
NUM_ENVS = 8


@pytest.fixture(scope="module")
def device() -> torch.device:
    return resolve_device("cuda")


def make_learner(device: torch.device, **changes) -> DQNLearner:
    torch.manual_seed(0)  # every runner starts from the same weights
    return DQNLearner(CFG.updated(**changes), (4,), 2, device)


def add_random_steps(replay: ReplayBuffer, vector_steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(vector_steps):
        replay.add(
            torch.randn(NUM_ENVS, 4, generator=g).to(replay.device),
            torch.randint(0, 2, (NUM_ENVS,), generator=g).to(replay.device),
            torch.randn(NUM_ENVS, generator=g).to(replay.device),
            torch.randn(NUM_ENVS, 4, generator=g).to(replay.device),
            (torch.rand(NUM_ENVS, generator=g) < 0.1).float().to(replay.device),
        )


@pytest.fixture
def replay(device) -> ReplayBuffer:
    """Half full: the captured sampler has to follow the fill level as transitions keep arriving."""
    replay = ReplayBuffer(4096, NUM_ENVS, (4,), torch.float32, device)
    add_random_steps(replay, 256, seed=1)
    return replay


def in_lockstep(
    runner: UpdateRunner, reference: UpdateRunner, replay: ReplayBuffer, steps: int, first: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """`steps` updates of `runner` and of `reference`, both on `replay.graph_sample` (the draw a graph makes) with the
    same random numbers, as in training: the LR schedule moves, acting with a moving epsilon and new transitions come
    between updates. Returns (stats, |TD errors|) of both per update, copied before the next replay rewrites them."""
    out = []
    for step in range(first, first + steps):
        for r in (runner, reference):
            r.learner.set_learning_rate(learning_rate_at(CFG, step * 100))
        torch.cuda.manual_seed(step)
        stats = runner.step() if runner.kind == "graphed" else runner.update(replay.graph_sample(CFG.batch_size))
        stats, td = stats.clone(), runner.td_errors.clone()
        torch.cuda.manual_seed(step)
        ref_stats = reference.update(replay.graph_sample(CFG.batch_size))
        out.append((stats, td, ref_stats, reference.td_errors))
        obs = torch.randn(NUM_ENVS, 4, device=replay.device)
        runner.learner.act(obs, epsilon_at(CFG, step * 100))
        add_random_steps(replay, 1, seed=1000 + step)
    return out


def assert_same_learners(a: DQNLearner, b: DQNLearner, atol: float) -> None:
    for (name, p), q in zip(a.q.named_parameters(), b.q.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=f"{name} differs")
    for p, q in zip(a.q.parameters(), b.q.parameters()):
        for key, value in a.optimizer.state[p].items():
            torch.testing.assert_close(value, b.optimizer.state[q][key], rtol=1e-5, atol=atol, msg=key)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_captured_update_equals_the_uncaptured_one_over_many_steps(device, replay, compiled):
    """Learning rate, Adam's step count and the replay's fill level change after capture: frozen into the graph as
    Python values they would make the replays drift from the uncaptured updates."""
    graphed = make_update_runner(make_learner(device, compile=compiled, cuda_graph="always"), replay)
    reference = UpdateRunner(make_learner(device, compile=compiled, cuda_graph="never"), replay, compiled=compiled)
    assert graphed.kind == "graphed" and reference.kind == ("compiled" if compiled else "eager")
    steps = 60
    for stats, td, ref_stats, ref_td in in_lockstep(graphed, reference, replay, steps):
        torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(td, ref_td, rtol=1e-5, atol=1e-6)
    assert graphed.captures == 1 and graphed.graph is not None and not graphed.failed
    assert graphed.td_errors is graphed.outputs[1]  # every replay rewrites the captured output in place
    assert_same_learners(graphed.learner, reference.learner, atol=1e-6)
    assert all(st["step"].item() == steps for st in graphed.learner.optimizer.state.values())
    assert graphed.learner.lr.item() == pytest.approx(learning_rate_at(CFG, (steps - 1) * 100))
    assert graphed.read_metrics() == pytest.approx(reference.read_metrics(), rel=1e-5)


def test_captured_nstep_update_equals_the_uncaptured_one(device):
    """n-step returns stop at the replay's write head, which moves after capture: the graph reads it on the device."""
    replay = ReplayBuffer(4096, NUM_ENVS, (4,), torch.float32, device, n_step=3, gamma=CFG.gamma)
    add_random_steps(replay, 256, seed=1)
    graphed = make_update_runner(make_learner(device, cuda_graph="always", n_step=3), replay)
    reference = UpdateRunner(make_learner(device, cuda_graph="never", n_step=3), replay)
    assert graphed.kind == "graphed"
    for stats, td, ref_stats, ref_td in in_lockstep(graphed, reference, replay, 30):
        torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(td, ref_td, rtol=1e-5, atol=1e-6)
    assert graphed.captures == 1 and not graphed.failed
    assert_same_learners(graphed.learner, reference.learner, atol=1e-6)


def test_compiled_update_matches_eager_on_cuda(device, replay):
    compiled = UpdateRunner(make_learner(device, compile=True, cuda_graph="never"), replay, compiled=True)
    eager = UpdateRunner(make_learner(device, cuda_graph="never"), replay)
    start = torch.cat([p.detach().flatten() for p in eager.learner.q.parameters()])
    for stats, td, ref_stats, ref_td in in_lockstep(compiled, eager, replay, 20):
        torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(td, ref_td, rtol=1e-4, atol=1e-4)
    moved = [torch.cat([p.detach().flatten() for p in r.learner.q.parameters()]) - start for r in (compiled, eager)]
    assert (moved[0] - moved[1]).norm() < 1e-3 * moved[1].norm()


def test_bf16_update_matches_fp32_loosely_and_keeps_fp32_state(device, replay):
    """bf16 autocast, compiled and captured, against the fp32 eager update: loss within 2 %, the same direction
    of travel; weights, Adam's moments and the metric sums stay float32 (no GradScaler needed). Captured, the bf16
    step is exactly the uncaptured one."""
    amp = make_update_runner(make_learner(device, compile=True, amp=True), replay)
    fp32 = UpdateRunner(make_learner(device, cuda_graph="never"), replay)
    assert amp.kind == "graphed"
    start = torch.cat([p.detach().flatten() for p in fp32.learner.q.parameters()])
    for stats, _, ref_stats, _ in in_lockstep(amp, fp32, replay, 8):
        torch.testing.assert_close(stats[0], ref_stats[0], rtol=2e-2, atol=2e-3)
    moved_amp = torch.cat([p.detach().flatten() for p in amp.learner.q.parameters()]) - start
    moved_fp32 = torch.cat([p.detach().flatten() for p in fp32.learner.q.parameters()]) - start
    assert (moved_amp - moved_fp32).norm() < 0.2 * moved_fp32.norm()
    for p in amp.learner.q.parameters():
        assert p.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in amp.learner.optimizer.state[p].values())
    assert amp.metrics_sum.dtype == torch.float32
    graphed = make_update_runner(make_learner(device, compile=True, amp=True), replay)
    uncaptured = UpdateRunner(make_learner(device, compile=True, amp=True, cuda_graph="never"), replay, compiled=True)
    for stats, td, ref_stats, ref_td in in_lockstep(graphed, uncaptured, replay, 2 * WARMUP):
        torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(td, ref_td, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_a_checkpoint_load_is_captured_again_and_trains_the_loaded_state(device, replay, compiled):
    """A load replaces Adam's state tensors; the old graph would go on writing the old ones (and the loaded
    moments would never move). The runner captures again and matches an uncaptured runner given the same state."""
    graphed = make_update_runner(make_learner(device, compile=compiled, cuda_graph="always"), replay)
    graphed.run(WARMUP + 5)
    snapshot = copy.deepcopy(graphed.learner.state_dict())
    graphed.run(5)
    graphed.learner.load_state_dict(copy.deepcopy(snapshot))
    reference = UpdateRunner(make_learner(device, compile=compiled, cuda_graph="never"), replay, compiled=compiled)
    reference.learner.load_state_dict(copy.deepcopy(snapshot))
    for stats, td, ref_stats, ref_td in in_lockstep(graphed, reference, replay, 8):
        torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(td, ref_td, rtol=1e-5, atol=1e-6)
    assert graphed.captures == 2
    assert_same_learners(graphed.learner, reference.learner, atol=1e-6)


def test_a_failed_capture_restores_the_stream_and_the_random_generator(device):
    """torch.cuda.graph leaves the capture stream current and the generator in capture mode when the capture
    fails; the next torch.rand then raises. capture() restores both, and a later capture works."""
    x = torch.ones(4, device=device)
    with torch.cuda.device(device):
        default = torch.cuda.current_stream()
        with pytest.raises(CaptureError):
            capture(lambda: x.sum().item(), device)  # a host sync cannot be captured
        assert torch.cuda.current_stream() == default
        assert not torch.cuda.is_current_stream_capturing()
        torch.cuda.manual_seed(3)
        a, b = torch.rand(8, device=device), torch.rand(8, device=device)
        assert not torch.equal(a, b)  # the offset advances: the generator is out of capture mode
        torch.cuda.manual_seed(3)
        assert torch.equal(torch.rand(8, device=device), a)
        graph, out = capture(lambda: torch.rand(8, device=device) * 2, device)
        torch.cuda.manual_seed(3)
        graph.replay()
        assert torch.equal(out, 2 * a)  # the captured draw is the eager one
        graph.replay()
        assert not torch.equal(out, 2 * a)


def test_a_runner_whose_capture_fails_warns_once_and_runs_uncaptured(device, replay):
    learner = make_learner(device, cuda_graph="auto", compile=False)
    graphed = GraphedUpdate(learner, replay)
    eager_step = graphed.step_fn

    def syncing_step(batch):
        stats, td = eager_step(batch)
        stats[0].item()  # a host sync: capture fails
        return stats, td

    graphed.step_fn = syncing_step
    reference = UpdateRunner(make_learner(device, cuda_graph="never"), replay)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stats, td, ref_stats, ref_td in in_lockstep(graphed, reference, replay, WARMUP + 4):
            torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(td, ref_td, rtol=1e-5, atol=1e-6)
    ours = [w for w in caught if str(w.message).startswith("CUDA graph capture of the update failed")]
    assert len(ours) == 1 and "running it uncaptured" in str(ours[0].message)
    assert graphed.failed and graphed.captures == 0 and graphed.metrics_count == WARMUP + 4


def test_staging_copies_arrive_intact_while_the_gpu_is_busy(device):
    """The pinned buffers take turns every vector step: a buffer rewritten before its non_blocking copy ran would
    corrupt the data. Between copies the GPU is kept busy, as with a phase of updates."""
    fields = {
        "obs": ((NUM_ENVS, 4), torch.float32),
        "rewards": ((NUM_ENVS,), torch.float32),
        "terminated": ((NUM_ENVS,), torch.float32),
    }
    staging = Staging(device, fields)
    busy = torch.randn(2048, 2048, device=device)
    rng = np.random.default_rng(0)
    sent, stored, actions_back = [], [], []
    for step in range(100):
        obs = rng.standard_normal((NUM_ENVS, 4)).astype(np.float32)
        rewards = rng.standard_normal(NUM_ENVS)
        terminated = rng.random(NUM_ENVS) < 0.3
        host = staging.fill()
        host["obs"][...], host["rewards"][...], host["terminated"][...] = obs, rewards, terminated
        dev = staging.send()
        for _ in range(3):
            busy = torch.tanh(busy @ busy * 1e-3)
        actions_t = (dev["obs"][:, 0] > 0).long() + step % 3
        actions = staging.to_host(actions_t)
        stored.append((dev["obs"].clone(), dev["rewards"].clone(), dev["terminated"].clone()))
        sent.append((obs, rewards, terminated))
        actions_back.append((actions, (obs[:, 0] > 0).astype(np.int64) + step % 3))
    torch.cuda.synchronize(device)
    for (obs, rewards, terminated), (obs_t, rewards_t, terminated_t) in zip(sent, stored):
        assert np.array_equal(obs_t.cpu().numpy(), obs)
        assert np.allclose(rewards_t.cpu().numpy(), rewards.astype(np.float32))
        assert np.array_equal(terminated_t.cpu().numpy(), terminated.astype(np.float32))
    assert all(np.array_equal(got, want) for got, want in actions_back)
    assert all(buf.is_pinned() for buf in staging.host) and staging.actions.is_pinned()
    assert all(buf.device == device for buf in staging.dev)


def test_frame_replay_sampling_is_captured_and_follows_the_buffer_as_it_fills(device):
    """FrameReplay samples from device-side bounds refreshed by every add: a graph captured early keeps drawing
    exactly what the eager sampler draws, rows added after the capture included; the whole CNN update captured
    on it matches the uncaptured one."""
    envs, stack = 2, 4
    replay = FrameReplay(40 * envs, envs, (84, 84), stack, device)
    g = torch.Generator().manual_seed(0)

    def add_rows(rows: int, marker: int) -> None:
        for _ in range(rows):
            frames = torch.full((envs, 84, 84), marker, dtype=torch.uint8)
            replay.add(
                frames.to(device),
                torch.randint(0, 3, (envs,), generator=g).to(device),
                torch.randn(envs, generator=g).to(device),
                (torch.rand(envs, generator=g) < 0.1).to(torch.uint8).to(device),
                (torch.rand(envs, generator=g) < 0.05).to(device),
            )

    replay.add_resets(torch.zeros(envs, 84, 84, dtype=torch.uint8, device=device))
    add_rows(10, marker=1)
    replay.graph_sample(64)  # its kernels run once before the capture (as the runner's warm-up updates do)
    graph, batch = capture(lambda: replay.graph_sample(64), device)
    add_rows(20, marker=2)  # rows the graph has never seen
    seen = set()
    for seed in range(5):
        torch.cuda.manual_seed(seed)
        graph.replay()
        captured = [t.clone() for t in batch[:5]]
        torch.cuda.manual_seed(seed)
        eager = replay.sample(64)
        for got, want in zip(captured, eager[:5]):
            assert torch.equal(got, want)
        seen |= set(captured[3][:, -1, 0, 0].tolist())
    assert 2 in seen  # the captured sampler reaches rows added after the capture

    cfg = CFG.updated(batch_size=16, cuda_graph="always", learning_rate=1e-4)
    learners = []
    for _ in range(2):
        torch.manual_seed(0)
        learners.append(DQNLearner(cfg, (stack, 84, 84), 3, device))
    graphed = make_update_runner(learners[0], replay)
    reference = UpdateRunner(learners[1], replay)
    for step in range(WARMUP + 4):
        torch.cuda.manual_seed(step)
        stats = graphed.step().clone()
        torch.cuda.manual_seed(step)
        torch.testing.assert_close(stats, reference.update(replay.sample(16)), rtol=1e-4, atol=1e-5)
    assert graphed.kind == "graphed" and graphed.captures == 1


def test_a_cuda_checkpoint_resumes_on_the_cpu_and_a_cpu_one_on_cuda(device, replay):
    graphed = make_update_runner(make_learner(device, compile=False, cuda_graph="always"), replay)
    graphed.run(WARMUP + 3)
    saved = io.BytesIO()
    torch.save(graphed.learner.state_dict(), saved)  # as a checkpoint, loaded the way a resume loads it
    saved.seek(0)
    state = torch.load(saved, map_location="cpu", weights_only=True)
    cpu_learner = DQNLearner(CFG.updated(device="cpu"), (4,), 2, torch.device("cpu"))
    cpu_learner.load_state_dict(state)
    cpu_replay = ReplayBuffer(4096, NUM_ENVS, (4,), torch.float32, torch.device("cpu"))
    cpu_replay.load_state_dict(replay.state_dict())
    cpu_runner = make_update_runner(cpu_learner, cpu_replay)
    cpu_runner.run(3)  # failed at the first step when the saved capturable flag came back with the state
    assert cpu_runner.read_metrics()["loss"] > 0
    back = make_update_runner(make_learner(device, compile=False, cuda_graph="always"), replay)
    back.learner.load_state_dict(cpu_learner.state_dict())
    back.run(WARMUP + 3)
    assert back.captures == 1 and all(st["step"].device == device for st in back.learner.optimizer.state.values())


@pytest.mark.parametrize(
    "variant",
    [{"compile": True}, {"compile": True, "amp": True}, {"cuda_graph": "always"}, {"cuda_graph": "never"}],
    ids=["compiled-graphed", "compiled-amp-graphed", "eager-graphed", "eager"],
)
def test_short_cartpole_run_on_cuda_learns(tmp_path, variant):
    """The whole loop on the GPU (staging, device replay, runner) learns: a sign error, a stale graph input or a
    frozen learning rate would keep returns near 20."""
    cfg = Config(
        device="cuda",
        seed=3,
        num_envs=1,
        train_every=4,
        gradient_steps=1,
        learning_rate=1e-3,
        total_steps=10_000,
        learning_starts=500,
        epsilon_decay_steps=4_000,
        epsilon_end=0.05,
        batch_size=128,
        buffer_size=50_000,
        eval_every=2_500,
        eval_episodes=5,
        hidden_sizes=[64, 64],
        log_every=2_500,
        checkpoint_every=0,
        target_update_interval=250,
        compile_mode="default",
        **variant,
    )
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    expected = "graphed" if variant.get("compile") or variant.get("cuda_graph") == "always" else "eager"
    assert trainer.updates.kind == expected
    result = trainer.run()
    means = [mean for _, mean, _ in result.evals]
    assert len(means) == 4 and means[0] < 100  # it starts out poor
    assert max(means) >= 100, means
    if expected == "graphed":
        assert trainer.updates.captures == 1 and not trainer.updates.failed


def test_free_memory_counts_what_pytorch_caches(device):
    block = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    del block  # back to PyTorch's cache, which the driver still counts as used
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert cached >= 256 << 20
    assert free_bytes(device) >= torch.cuda.mem_get_info(device)[0] + (256 << 20)


def test_tf32_is_off_unless_asked_for(device):
    a = torch.randn(1024, 1024, device=device)
    exact = (a.double() @ a.double()).float()
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        use_device(device, tf32=False)
        full = ((a @ a) - exact).abs().max().item()
        use_device(device, tf32=True)
        tf32 = ((a @ a) - exact).abs().max().item()
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
    assert full < 1e-3 < tf32, (full, tf32)  # TF32 keeps 10 mantissa bits: errors of ~1e-2 on sums of 1024


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_run_on_the_second_gpu_captures_and_stages_there():
    """cuda:1 while cuda:0 is current: streams, events and the capture's generator must be cuda:1's."""
    torch.cuda.set_device(0)
    second = resolve_device("cuda:1")
    replay = ReplayBuffer(4096, NUM_ENVS, (4,), torch.float32, second)
    add_random_steps(replay, 256, seed=1)
    runner = make_update_runner(make_learner(second, cuda_graph="always"), replay)
    runner.run(WARMUP + 3)
    assert runner.captures == 1 and runner.read_metrics()["loss"] > 0
    staging = Staging(second, {"obs": ((8, 4), torch.float32)})
    obs = np.arange(32, dtype=np.float32).reshape(8, 4)
    staging.fill()["obs"][...] = obs
    assert np.array_equal(staging.to_host(staging.send()["obs"] * 2), obs * 2)


def test_new_learners_reuse_the_compiled_step_on_cuda(device, replay):
    """Bench and sweeps build many learners in one process: a step compiled per learner recompiled for each and
    ran eagerly, without a word, past torch's recompile limit."""
    make_update_runner(make_learner(device, compile=True, cuda_graph="never")).update(
        replay.graph_sample(CFG.batch_size)
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(10):
            torch.manual_seed(seed)
            runner = make_update_runner(DQNLearner(CFG.updated(compile=True, cuda_graph="never"), (4,), 2, device))
            before = [p.clone() for p in runner.learner.q.parameters()]
            runner.update(replay.graph_sample(CFG.batch_size))
            assert runner.kind == "compiled"
            assert all(not torch.equal(a, p) for a, p in zip(before, runner.learner.q.parameters()))


def test_the_compiled_update_is_one_graph_on_cuda(device, replay):
    """Adam inside the compiled step: with capturable=False torch runs it outside the graph on CUDA, reading each
    step count with .item(). Last in this file: explain() resets torch.compile's caches."""
    learner = make_learner(device)
    batch = replay.graph_sample(CFG.batch_size)
    with torch.no_grad():
        explained = torch._dynamo.explain(single_graph_step)(
            *learner.functional_state(), batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated
        )
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
