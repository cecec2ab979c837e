"""The eager step's hand-written MLP gradients (`hand_gradients`) against autograd on the same loss.

A plain MLP's eager update takes its gradients from `MLPQNetwork.backward_from` and `td_loss_grad` instead of the
autograd engine (faster for small MLPs). They must be autograd's: every loss, target and batch setting, and a
normalizing network, on the same batch; and a whole `step_on` must leave the weights that the autograd step
leaves. A population's stacked networks take them too (`StackedAgents.update`), each agent its own.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from fastdqn.config import Config
from fastdqn.learner import DQNLearner, batch_td_loss, by_hand, hand_gradients
from fastdqn.networks import MLPQNetwork, build_q_network
from fastdqn.population import stacked_losses
from fastdqn.replay import Batch

CPU = torch.device("cpu")
OBS_DIM, N_ACTIONS, B = 5, 3, 64


def batch(seed: int, discounts: bool, weights: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(B, OBS_DIM, generator=g) * 3,
        torch.randint(0, N_ACTIONS, (B,), generator=g),
        torch.randn(B, generator=g) * 10,  # large TD errors: some Huber terms are linear, some quadratic
        torch.randn(B, OBS_DIM, generator=g) * 3,
        (torch.rand(B, generator=g) < 0.2).float(),
        torch.rand(B, generator=g) if discounts else None,
        torch.rand(B, generator=g) if weights else None,
    )


def learner(**changes) -> DQNLearner:
    torch.manual_seed(0)
    cfg = Config(device="cpu", hidden_sizes=[32, 16], huber_delta=0.5, **changes).validate()
    return DQNLearner(cfg, (OBS_DIM,), N_ACTIONS, CPU)


SETTINGS = list(itertools.product(["huber", "mse"], [True, False], ["hard", "none"]))


@pytest.mark.parametrize("loss, double_dqn, target_update", SETTINGS)
@pytest.mark.parametrize("discounts, weights, normalize_obs", [(False, False, False), (True, True, True)])
def test_hand_gradients_are_autograd_s(loss, double_dqn, target_update, discounts, weights, normalize_obs):
    lr = learner(loss=loss, double_dqn=double_dqn, target_update=target_update, normalize_obs=normalize_obs)
    b = batch(1, discounts, weights)
    if normalize_obs:
        lr.observe(b.obs)  # statistics away from (0, 1), so the normalizer does something
    with torch.no_grad():  # a target apart from the online net, so that the targets are the target net's
        for p in lr.target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hand_loss, hand_q, hand_y, hand = hand_gradients(lr.cfg, lr.q, lr.target_net, *b.loss_inputs())
    loss_t, q, y = batch_td_loss(lr.cfg, lr.q, lr.target_net, *b.loss_inputs())
    grads = torch.autograd.grad(loss_t, list(lr.q.parameters()))
    assert torch.allclose(hand_loss, loss_t.detach(), rtol=1e-6, atol=0)
    assert torch.equal(hand_q, q.detach()) and torch.equal(hand_y, y)
    assert len(hand) == len(grads)
    for h, a in zip(hand, grads):
        assert h.shape == a.shape and h.is_contiguous()  # the fused Adam kernel reads gradients in memory order
        assert torch.allclose(h, a, rtol=1e-5, atol=1e-7), (h - a).abs().max()
    assert any(g.abs().sum() > 0 for g in hand)


def test_a_step_on_hand_gradients_leaves_autograd_s_weights():
    hand, auto = learner(max_grad_norm=1.0), learner(max_grad_norm=1.0)
    assert hand.by_hand
    auto.by_hand = False  # the autograd step on the same learner type
    for seed in range(5):
        b = batch(seed, False, False)
        hand_stats, hand_td = hand.step_on(b)
        auto_stats, auto_td = auto.step_on(b)
        assert torch.allclose(hand_stats, auto_stats, rtol=1e-5) and torch.allclose(hand_td, auto_td, atol=1e-6)
    for h, a in zip(hand.q.parameters(), auto.q.parameters()):
        assert torch.allclose(h, a, atol=1e-6)
    assert any(not torch.equal(h, a) for h, a in zip(hand.q.parameters(), learner().q.parameters()))  # it trained


def test_only_plain_mlps_take_hand_gradients():
    cfg = Config(device="cpu", hidden_sizes=[8]).validate()
    assert by_hand(build_q_network((OBS_DIM,), N_ACTIONS, cfg))
    assert not by_hand(build_q_network((OBS_DIM,), N_ACTIONS, cfg.updated(dueling=True)))
    assert not by_hand(build_q_network((10, 10, 4), N_ACTIONS, cfg))  # a MinAtar grid: a CNN
    with pytest.raises(AssertionError, match="plain MLP"):
        net = MLPQNetwork(OBS_DIM, N_ACTIONS, [8], dueling=True)
        hand_gradients(cfg, net, copy.deepcopy(net), *batch(0, False, False).loss_inputs())


def stacked(nets: list[MLPQNetwork]) -> MLPQNetwork:
    """A network whose parameters are `nets`' stacked along a first agent dim (as a population holds them)."""
    out = copy.deepcopy(nets[0])
    for name, _ in nets[0].named_parameters():
        module_name, _, attr = name.rpartition(".")
        whole = torch.stack([net.get_parameter(name).detach() for net in nets])
        out.get_submodule(module_name)._parameters[attr] = torch.nn.Parameter(whole)
    return out


@pytest.mark.parametrize("loss, double_dqn, target_update", SETTINGS)
def test_a_population_s_hand_gradients_are_autograd_s(loss, double_dqn, target_update):
    k = 3
    cfg = Config(device="cpu", hidden_sizes=[32, 16], huber_delta=0.5, loss=loss, double_dqn=double_dqn)
    cfg = cfg.updated(target_update=target_update).validate()
    torch.manual_seed(0)
    q_net = stacked([MLPQNetwork(OBS_DIM, N_ACTIONS, [32, 16]) for _ in range(k)])
    target = None if target_update == "none" else stacked([MLPQNetwork(OBS_DIM, N_ACTIONS, [32, 16]) for _ in range(k)])
    parts = [batch(seed, True, False) for seed in range(k)]  # each agent its own batch, n-step discounts
    b = Batch(
        *(
            torch.stack([getattr(p, f) for p in parts])
            for f in ("obs", "actions", "rewards", "next_obs", "terminated", "discounts")
        )
    )
    inputs = b.loss_inputs()[:-1]
    losses, q, _, hand = hand_gradients(cfg, q_net, target, *inputs, None, per_agent=True)
    auto_losses, auto_q = stacked_losses([cfg] * k, q_net, target, *inputs)
    grads = torch.autograd.grad(auto_losses.sum(), list(q_net.parameters()))
    assert losses.shape == (k,) and torch.allclose(losses, auto_losses.detach(), rtol=1e-6)
    assert torch.equal(q, auto_q.detach())
    for h, a in zip(hand, grads):
        assert h.shape == a.shape and h.is_contiguous()
        assert torch.allclose(h, a, rtol=1e-5, atol=1e-7), (h - a).abs().max()
    # and agent 1's gradients are those of its own network alone
    own = hand_gradients(
        cfg, unstack(q_net, 1), None if target is None else unstack(target, 1), *parts[1].loss_inputs()
    )[3]
    for h, o in zip(hand, own):
        assert torch.allclose(h[1], o, rtol=1e-5, atol=1e-7)


def unstack(net: MLPQNetwork, j: int) -> MLPQNetwork:
    """Agent j's network of a stacked one."""
    out = MLPQNetwork(OBS_DIM, N_ACTIONS, [32, 16])
    for name, p in out.named_parameters():
        p.data.copy_(net.get_parameter(name)[j])
    return out
