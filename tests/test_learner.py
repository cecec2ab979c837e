"""DQNLearner: the update computes the TD loss it should, target nets update as configured, acting honours
epsilon, and the compiled and bf16 paths learn on a fixed batch."""

from __future__ import annotations

import copy

import pytest
import torch

from compile_checks import assert_compiled
from fastdqn.adam import STATE_KEYS
from fastdqn.config import Config
from fastdqn.learner import METRICS, DQNLearner, batch_td_loss, td_loss, td_targets
from fastdqn.replay import Batch
from fastdqn.update_runner import make_update_runner

CPU = torch.device("cpu")
OBS_DIM, N_ACTIONS, BATCH = 4, 3, 64


def make_learner(**changes) -> DQNLearner:
    torch.manual_seed(0)
    cfg = Config(hidden_sizes=[32, 32], device="cpu").updated(**changes)
    return DQNLearner(cfg, (OBS_DIM,), N_ACTIONS, CPU)


def update(learner: DQNLearner, batch: Batch) -> torch.Tensor:
    """One update of `learner` on `batch` by the update runner its config asks for; [loss, mean Q, grad norm]."""
    return make_update_runner(learner).update(batch)


def fixed_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(BATCH, OBS_DIM, generator=g),
        actions=torch.randint(0, N_ACTIONS, (BATCH,), generator=g),
        rewards=torch.randn(BATCH, generator=g),
        next_obs=torch.randn(BATCH, OBS_DIM, generator=g),
        terminated=(torch.rand(BATCH, generator=g) < 0.2).float(),
    )


def perturb(net: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)


def expected_loss(learner: DQNLearner, batch: Batch) -> float:
    """The TD loss computed the slow, obvious way, before the update."""
    cfg = learner.cfg
    with torch.no_grad():
        q = learner.q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        next_target = learner.target(batch.next_obs)
        next_online = learner.q(batch.next_obs) if cfg.double_dqn else None
        y = td_targets(batch.rewards, batch.terminated, cfg.gamma, next_target, next_online)
        return td_loss(q, y, cfg.loss, cfg.huber_delta).item()


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"double_dqn": True},
        {"loss": "mse"},
        {"target_update": "none"},
        {"target_update": "none", "double_dqn": True},
        {"target_update": "soft", "double_dqn": True, "loss": "mse", "normalize_obs": True},
    ],
)
def test_update_reports_the_td_loss_of_its_batch(changes):
    learner = make_learner(gamma=0.9, **changes)
    if learner.target is not learner.q:
        perturb(learner.target)  # a target net that differs from the online one, so mixing them up shows
    batch = fixed_batch()
    expected = expected_loss(learner, batch)
    stats = update(learner, batch)
    assert stats.shape == (len(METRICS),)
    assert stats[0].item() == pytest.approx(expected, rel=1e-5)


def test_hard_target_is_fixed_between_syncs_and_sync_copies_params_and_buffers():
    learner = make_learner(normalize_obs=True)
    assert all(not p.requires_grad for p in learner.target.parameters())
    before = params(learner.target)
    learner.observe(torch.randn(16, OBS_DIM) * 3 + 1)  # moves the online net's normalizer buffers
    for seed in range(3):
        update(learner, fixed_batch(seed))
    assert all(torch.equal(a, b) for a, b in zip(before, params(learner.target)))
    online = params(learner.q)
    assert not all(torch.equal(a, b) for a, b in zip(online, before))
    learner.sync_target()
    after = params(learner.target)
    assert len(after) == len(online) and all(torch.equal(a, b) for a, b in zip(online, after))
    assert learner.target.normalizer.count.item() == pytest.approx(16.0)
    # a copy, not shared storage: the next update moves the online net only
    update(learner, fixed_batch(5))
    assert all(torch.equal(a, b) for a, b in zip(after, params(learner.target)))


def test_soft_update_is_a_tau_lerp_towards_the_updated_online_net():
    tau = 0.1
    learner = make_learner(target_update="soft", tau=tau, normalize_obs=True)
    perturb(learner.target, 1.0)
    learner.observe(torch.randn(16, OBS_DIM) + 2)
    target_before = [p.detach().clone() for p in learner.target.parameters()]
    update(learner, fixed_batch())
    for old, new, online in zip(target_before, learner.target.parameters(), learner.q.parameters()):
        assert torch.allclose(new, old + tau * (online - old), atol=1e-6)
        assert not torch.allclose(new, online)
    for target_buf, online_buf in zip(learner.target.buffers(), learner.q.buffers()):
        assert torch.equal(target_buf, online_buf)  # normalizer statistics are copied, not averaged


def test_no_target_network_means_the_online_net():
    learner = make_learner(target_update="none")
    assert learner.target is learner.q
    before = params(learner.q)
    learner.sync_target()  # nothing to copy, and nothing breaks
    assert all(torch.equal(a, b) for a, b in zip(before, params(learner.q)))


def test_act_with_epsilon_zero_is_greedy():
    learner = make_learner()
    obs = torch.randn(500, OBS_DIM)
    with torch.no_grad():
        greedy = learner.q(obs).argmax(dim=1)
    assert torch.equal(learner.act(obs, 0.0), greedy)
    assert greedy.unique().numel() > 1  # the check above is not trivially about one action


def test_act_with_epsilon_one_is_uniform_over_actions():
    torch.manual_seed(3)
    learner = make_learner()
    draws = 30_000
    actions = learner.act(torch.zeros(draws, OBS_DIM), 1.0)
    assert actions.dtype == torch.int64 and actions.device == CPU
    counts = torch.bincount(actions, minlength=N_ACTIONS).double()
    assert counts.numel() == N_ACTIONS
    expected = draws / N_ACTIONS
    assert float(((counts - expected) ** 2 / expected).sum()) < 20  # chi-square, 2 dof


def test_act_with_intermediate_epsilon_mixes():
    torch.manual_seed(4)
    learner = make_learner()
    obs = torch.zeros(30_000, OBS_DIM)  # one observation: one greedy action
    greedy = learner.act(obs[:1], 0.0).item()
    share = (learner.act(obs, 0.3) == greedy).double().mean().item()
    assert share == pytest.approx(0.7 + 0.3 / N_ACTIONS, abs=0.015)


def test_amp_acting_picks_the_fp32_greedy_action_between_close_large_q_values():
    """Q-values near 100 with gaps under bf16's step there (0.5): a bf16 argmax would tie or flip them."""
    learner = make_learner(amp=True)
    with torch.no_grad():
        learner.q.net[-1].bias.copy_(torch.tensor([100.0, 100.05, 100.1]))
    obs = torch.randn(2_000, OBS_DIM) * 0.01  # small inputs: the bias dominates, the gaps stay small
    with torch.no_grad():
        q = learner.q(obs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q_autocast = learner.q(obs)
    assert (q.bfloat16().argmax(dim=1) != q.argmax(dim=1)).any()  # the hazard is real on this network
    assert torch.equal(learner.act(obs, 0.0), q.argmax(dim=1))
    assert torch.equal(q_autocast.argmax(dim=1), q.argmax(dim=1))  # the update's Q-values are float32 as well


def test_grad_norm_is_reported_before_clipping_and_the_step_uses_the_clipped_gradient():
    learner = make_learner(max_grad_norm=1e-3)
    batch = fixed_batch()
    reference = make_learner(max_grad_norm=0.0)
    reference.by_hand = False  # its autograd step leaves the raw gradients in .grad
    update(reference, batch)
    raw_norm = torch.norm(torch.stack([p.grad.norm() for p in reference.q.parameters()])).item()
    stats = update(learner, batch)
    assert stats[2].item() == pytest.approx(raw_norm, rel=1e-4) and raw_norm > 1e-2
    # Adam's first moment after one step is (1 - beta1) * the gradient it was given: the clipped one
    first_moment = [learner.optimizer.state[p]["exp_avg"] / 0.1 for p in learner.q.parameters()]
    assert torch.norm(torch.stack([m.norm() for m in first_moment])).item() == pytest.approx(1e-3, rel=1e-3)


def test_zero_grad_sets_gradients_to_none_not_zero():
    learner = make_learner()
    learner.by_hand = False  # the autograd step (dueling and CNN networks take it)
    batch = fixed_batch()
    reference = make_learner()
    reference.by_hand = False
    update(reference, batch)
    stale = []
    for p in learner.q.parameters():
        p.grad = torch.full_like(p, 1e3)  # left over from an earlier step
        stale.append(p.grad)
    update(learner, batch)
    for p, old, ref in zip(learner.q.parameters(), stale, reference.q.parameters()):
        assert p.grad is not old  # a fresh tensor: the old one was dropped (set_to_none), not zeroed in place
        assert torch.equal(old, torch.full_like(p, 1e3))
        assert torch.allclose(p.grad, ref.grad)  # and the stale values were not accumulated


def test_hand_gradients_ignore_stale_grad_attributes():
    learner, reference = make_learner(), make_learner()
    assert learner.by_hand
    batch = fixed_batch()
    update(reference, batch)
    for p in learner.q.parameters():
        p.grad = torch.full_like(p, 1e3)
    update(learner, batch)
    assert all(torch.equal(a, b) for a, b in zip(params(learner.q), params(reference.q)))


def test_learning_rate_tensor_is_what_adam_steps_with():
    batch = fixed_batch()
    frozen = make_learner()
    frozen.set_learning_rate(0.0)
    before = params(frozen.q)
    update(frozen, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, params(frozen.q)))

    learner = make_learner()
    learner.set_learning_rate(2.5e-3)
    reference = make_learner()
    adam = torch.optim.Adam(reference.q.parameters(), lr=2.5e-3, eps=reference.cfg.adam_eps)
    update(learner, batch)
    y = td_targets(batch.rewards, batch.terminated, reference.cfg.gamma, reference.target(batch.next_obs).detach())
    q = reference.q(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    adam.zero_grad()
    td_loss(q, y, "huber", 1.0).backward()
    torch.nn.utils.clip_grad_norm_(reference.q.parameters(), reference.cfg.max_grad_norm)
    adam.step()
    for a, b in zip(learner.q.parameters(), reference.q.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_adam_state_saved_with_other_flags_loads_with_the_learners_own():
    """A CUDA run's checkpoint (Adam capturable, not fused) resumed with --device cpu: the saved param group used to
    replace this learner's flags, and the first update failed ('If capturable=True, params and state_steps must be
    on supported devices'). The flags are the learner's own after a load, and the update is the plain one's."""
    source = make_learner()
    update(source, fixed_batch(0))
    from_cuda = copy.deepcopy(source.state_dict())
    from_cuda["optimizer"]["param_groups"][0].update(capturable=True, fused=None)
    plain, resumed = make_learner(), make_learner()
    plain.load_state_dict(copy.deepcopy(source.state_dict()))
    resumed.load_state_dict(from_cuda)
    group = resumed.optimizer.param_groups[0]
    assert group["capturable"] is False and group["fused"] is True and group["lr"] is resumed.lr
    assert all(st["step"].dtype == torch.float32 for st in resumed.optimizer.state.values())
    assert torch.equal(update(resumed, fixed_batch(1)), update(plain, fixed_batch(1)))
    assert all(torch.equal(a, b) for a, b in zip(params(resumed.q), params(plain.q)))


def losses_on_a_fixed_batch(learner: DQNLearner, updates: int = 50) -> list[float]:
    """Regression to fixed targets: the target net is never synced here, so the loss should fall steadily."""
    batch = fixed_batch()
    return [update(learner, batch)[0].item() for _ in range(updates)]


def assert_learns(losses: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 0.9 * (len(losses) - 1), losses


def test_amp_loss_is_finite_and_decreases_on_a_fixed_batch():
    learner = make_learner(amp=True, learning_rate=1e-2)
    assert_learns(losses_on_a_fixed_batch(learner))
    assert all(p.dtype == torch.float32 for p in learner.q.parameters())  # weights and optimizer stay fp32


@pytest.mark.slow
def test_compiled_loss_is_finite_and_decreases_on_a_fixed_batch():
    learner = make_learner(compile=True, hidden_sizes=[16], learning_rate=1e-2)
    with assert_compiled():
        losses = losses_on_a_fixed_batch(learner)
    assert_learns(losses)
    eager = make_learner(hidden_sizes=[16], learning_rate=1e-2)
    assert losses[0] == pytest.approx(losses_on_a_fixed_batch(eager, 1)[0], rel=1e-4)


def torch_adam_step(learner: DQNLearner, optimizer: torch.optim.Adam, batch: Batch) -> torch.Tensor:
    """The eager update as torch's own optimizer and clip_grad_norm_ do it: the reference for FusedAdam."""
    loss, q, _ = batch_td_loss(
        learner.cfg,
        learner.q,
        learner.target_net,
        batch.obs,
        batch.actions,
        batch.rewards,
        batch.next_obs,
        batch.terminated,
        None,
        None,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = learner.cfg.max_grad_norm if learner.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.q.parameters(), max_norm)
    optimizer.step()
    return torch.stack([loss.detach(), q.detach().mean(), grad_norm])


@pytest.mark.parametrize("max_grad_norm", [0.0, 10.0, 1e-3])
def test_eager_update_is_bit_for_bit_torch_adam_with_clip_grad_norm(max_grad_norm):
    """FusedAdam and the clipping in `clip_scale` against torch.optim.Adam(fused=True) and clip_grad_norm_ over
    several updates, the LR changed on the way: the same weights, moments and metrics, to the bit."""
    ours, theirs = make_learner(max_grad_norm=max_grad_norm), make_learner(max_grad_norm=max_grad_norm)
    reference = torch.optim.Adam(theirs.q.parameters(), lr=theirs.lr, eps=theirs.cfg.adam_eps, fused=True)
    for seed in range(6):
        if seed == 3:
            ours.set_learning_rate(3e-4)
            theirs.set_learning_rate(3e-4)
        assert torch.equal(update(ours, fixed_batch(seed)), torch_adam_step(theirs, reference, fixed_batch(seed)))
    assert all(torch.equal(a, b) for a, b in zip(params(ours.q), params(theirs.q)))
    for p, r in zip(ours.q.parameters(), theirs.q.parameters()):
        assert all(torch.equal(ours.optimizer.state[p][k], reference.state[r][k]) for k in STATE_KEYS)


def test_fused_adam_state_dict_has_torch_adams_format_and_loads_both_ways():
    """Checkpoints written with torch.optim.Adam load into FusedAdam and the other way round, and go on alike."""
    ours, theirs = make_learner(), make_learner()
    reference = torch.optim.Adam(theirs.q.parameters(), lr=theirs.lr, eps=theirs.cfg.adam_eps, fused=True)
    for seed in range(2):
        update(ours, fixed_batch(seed))
        torch_adam_step(theirs, reference, fixed_batch(seed))
    mine, torchs = ours.optimizer.state_dict(), reference.state_dict()
    assert mine["param_groups"][0].keys() == torchs["param_groups"][0].keys()
    assert {k: v for k, v in mine["param_groups"][0].items() if k != "lr"} == {
        k: v for k, v in torchs["param_groups"][0].items() if k != "lr"
    }
    assert mine["state"].keys() == torchs["state"].keys()
    assert all(torch.equal(mine["state"][i][k], torchs["state"][i][k]) for i in mine["state"] for k in STATE_KEYS)
    from_torch, to_torch = make_learner(), make_learner()
    from_torch.optimizer.load_state_dict(copy.deepcopy(torchs))
    from_torch.q.load_state_dict(theirs.q.state_dict())
    back = torch.optim.Adam(to_torch.q.parameters(), lr=to_torch.lr, fused=True)
    back.load_state_dict(copy.deepcopy(mine))
    to_torch.q.load_state_dict(ours.q.state_dict())
    assert torch.equal(update(from_torch, fixed_batch(5)), torch_adam_step(to_torch, back, fixed_batch(5)))
    assert all(torch.equal(a, b) for a, b in zip(params(from_torch.q), params(to_torch.q)))
    fresh = make_learner()
    fresh.optimizer.load_state_dict(make_learner().optimizer.state_dict() | {"state": {}})  # saved before a step
    assert all(float(st["step"]) == 0 and not st["exp_avg"].any() for st in fresh.optimizer.state.values())


def test_acting_at_epsilon_1_never_calls_the_network_and_draws_as_before():
    learner = make_learner()
    obs = torch.randn(64, OBS_DIM)
    learner.q.forward = lambda *args: pytest.fail("a forward pass while every env explores")
    torch.manual_seed(3)
    torch.rand(64)  # the explore draws come first, as in every act
    expected, after = torch.randint(0, N_ACTIONS, (64,)), torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(learner.act(obs, 1.0), expected)
    assert torch.equal(torch.get_rng_state(), after)  # the same draws, so seeded runs are unchanged
