"""The dueling head: the mean-advantage identity, its place in the Q-network, and that it learns."""

from __future__ import annotations

import pytest
import torch

from fastdqn.config import Config
from fastdqn.networks import DuelingHead, MLPQNetwork, build_q_network


@pytest.mark.parametrize("hidden", [0, 16])
def test_mean_over_actions_of_q_is_the_value_stream(hidden):
    torch.manual_seed(0)
    head = DuelingHead(8, 5, hidden=hidden)
    features = torch.randn(32, 8)
    q = head(features)
    value, advantage = head.value(features), head.advantage(features)
    assert q.shape == (32, 5) and value.shape == (32, 1)
    # Q = V + A - mean A: the mean over actions of Q is V, and Q - V is the centred advantage
    assert torch.allclose(q.mean(dim=1, keepdim=True), value, atol=1e-5)
    assert torch.allclose(q - value, advantage - advantage.mean(dim=1, keepdim=True), atol=1e-5)


def test_shifting_the_advantage_stream_does_not_change_q():
    torch.manual_seed(1)
    head = DuelingHead(4, 3)
    x = torch.randn(10, 4)
    before = head(x)
    with torch.no_grad():
        head.advantage.bias += 7.0  # the same constant added to every action's advantage
    assert torch.allclose(head(x), before, atol=1e-5)


def test_config_key_puts_the_head_on_the_mlp():
    plain = build_q_network((4,), 2, Config(hidden_sizes=[32]))
    dueling = build_q_network((4,), 2, Config(hidden_sizes=[32], dueling=True))
    assert not any(isinstance(m, DuelingHead) for m in plain.modules())
    assert isinstance(dueling.net[-1], DuelingHead)
    assert dueling(torch.randn(3, 4)).shape == (3, 2)


def test_dueling_network_fits_a_fixed_q_table():
    torch.manual_seed(2)
    net = MLPQNetwork(3, 4, [32], dueling=True)
    x = torch.eye(3)
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 5.0, 2.0], [7.0, 7.0, 7.0, 8.0]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3
