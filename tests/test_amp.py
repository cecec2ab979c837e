"""Mixed precision that does not change what is learned: under `amp` only convolutions run in bf16; Q-values, TD
targets, the loss and everything the optimizer sees are float32.

The reference is a CartPole MLP (the default config's 256x256) fitted to Q ~ 100, the values a solved CartPole
net reaches with gamma 0.99. bf16's step there is 0.5, so Q-values leaving the network in bf16 would be off by up
to 0.25; bf16 hidden layers before a float32 output layer still move them by more than 0.05.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from fastdqn.config import Config
from fastdqn.learner import DQNLearner, autocast, batch_td_loss, single_graph_step
from fastdqn.networks import MinAtarCNN, NatureCNN
from fastdqn.replay import Batch

CPU = torch.device("cpu")
TOLERANCE = 0.05  # what the Q-values under amp may differ from float32 at Q ~ 100


def cartpole_states(n: int, seed: int = 0) -> torch.Tensor:
    """States of CartPole-v1 played by a random policy."""
    env = gym.make("CartPole-v1")
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    states = []
    for _ in range(n):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        states.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
    return torch.as_tensor(np.array(states))


def cartpole_net_at_q_100(**changes) -> tuple[DQNLearner, torch.Tensor]:
    """A learner of the default CartPole config whose Q-network was fitted to Q ~ 100 on CartPole states, and those
    states: trained weights carry Q in their products (not in a bias), as a solved CartPole net's do."""
    torch.manual_seed(0)
    learner = DQNLearner(Config(device="cpu", **changes), (4,), 2, CPU)
    states = cartpole_states(2_000)
    angle, position = states[:, 2:3].abs(), states[:, 0:1].abs()
    targets = 100.0 - 30.0 * angle - torch.cat([5.0 * position, 8.0 * position], dim=1)
    fit = torch.optim.Adam(learner.q.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(states), (256,), generator=g)
        loss = torch.nn.functional.mse_loss(learner.q(states[idx]), targets[idx])
        fit.zero_grad()
        loss.backward()
        fit.step()
    return learner, states


def test_cartpole_q_values_at_100_under_amp_are_within_0_05_of_fp32():
    learner, states = cartpole_net_at_q_100(amp=True)
    with torch.no_grad():
        q = learner.q(states)
        with autocast(learner.cfg, "cpu"):
            q_amp = learner.q(states)
    assert 90 < q.mean().item() < 110
    assert q_amp.dtype == torch.float32
    assert (q_amp - q).abs().max().item() <= TOLERANCE
    # The hazards this avoids, on the same net: Q-values rounded to bf16 on their way out ...
    assert (q.bfloat16().float() - q).abs().max().item() > 0.1
    # ... and bf16 hidden layers before a float32 output layer.
    *hidden, output = learner.q.net
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = torch.nn.Sequential(*hidden)(states)
        q_bf16_hidden = output(features.float())
    assert (q_bf16_hidden - q).abs().max().item() > TOLERANCE


def test_amp_targets_loss_and_update_are_fp32_on_the_cartpole_net():
    """The update under amp, eager and the pure single-graph step (what --compile traces), gives the float32
    update's Q(s, a), TD targets, loss and new weights on the net at Q ~ 100."""
    fp32, states = cartpole_net_at_q_100()
    amp, _ = cartpole_net_at_q_100(amp=True)
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        states[:64],
        torch.randint(0, 2, (64,), generator=g),
        torch.ones(64),
        states[1:65],
        (torch.rand(64, generator=g) < 0.05).float(),
    )
    q, y = batch_td_loss(fp32.cfg, fp32.q, fp32.target_net, *batch[:5], None, None)[1:]
    q_amp, y_amp = batch_td_loss(amp.cfg, amp.q, amp.target_net, *batch[:5], None, None)[1:]
    assert q_amp.dtype == y_amp.dtype == torch.float32
    assert (q_amp - q).abs().max().item() <= TOLERANCE and (y_amp - y).abs().max().item() <= TOLERANCE
    stats, _ = fp32.step_on(batch)
    stats_amp, _ = amp.step_on(batch)
    torch.testing.assert_close(stats_amp, stats)
    for p, p_amp in zip(fp32.q.parameters(), amp.q.parameters()):
        assert all(v.dtype == torch.float32 for v in amp.optimizer.state[p_amp].values())  # what Adam saw
        torch.testing.assert_close(p_amp, p)
    graph_step, _ = cartpole_net_at_q_100(amp=True)
    with torch.no_grad():
        graph_stats, _ = single_graph_step(*graph_step.functional_state(), *batch[:5])
    torch.testing.assert_close(graph_stats, stats, rtol=1e-5, atol=1e-5)
    for p, p_graph in zip(fp32.q.parameters(), graph_step.q.parameters()):
        torch.testing.assert_close(p_graph, p, rtol=1e-5, atol=1e-6)


CNNS = {
    "minatar": (lambda dueling: MinAtarCNN((10, 10, 4), 3, dueling), lambda: torch.rand(5, 10, 10, 4) < 0.3),
    "nature": (
        lambda dueling: NatureCNN(4, 3, dueling),
        lambda: torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8),
    ),
}


@pytest.mark.parametrize("kind", CNNS)
@pytest.mark.parametrize("dueling", [False, True])
def test_cnns_run_their_convolutions_in_bf16_and_their_heads_in_fp32(kind, dueling):
    make_net, make_obs = CNNS[kind]
    net, obs = make_net(dueling), make_obs()
    dtypes: dict[str, torch.dtype] = {}
    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = net(obs)
    assert q.dtype == torch.float32 and q.shape == (5, 3)
    assert {d for n, d in dtypes.items() if n.startswith("torso")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.startswith("head")} == {torch.float32}
    torch.testing.assert_close(q, net(obs), rtol=0.05, atol=0.05)  # and close to the float32 forward


def test_minatar_cnn_update_under_amp_is_close_to_fp32_and_keeps_fp32_state():
    """The one place amp changes numbers: bf16 convolutions. The eager update stays close to fp32's."""

    def learner(amp: bool) -> DQNLearner:
        torch.manual_seed(0)
        return DQNLearner(Config(env_id="MinAtar/Breakout-v1", device="cpu", amp=amp), (10, 10, 4), 3, CPU)

    g = torch.Generator().manual_seed(2)
    obs = torch.rand(32, 10, 10, 4, generator=g) < 0.2
    batch = Batch(
        obs,
        torch.randint(0, 3, (32,), generator=g),
        torch.rand(32, generator=g),
        torch.roll(obs, 1, dims=1),
        torch.zeros(32),
    )
    fp32, amp = learner(False), learner(True)
    stats, _ = fp32.step_on(batch)
    stats_amp, _ = amp.step_on(batch)
    assert stats_amp.dtype == torch.float32
    torch.testing.assert_close(stats_amp, stats, rtol=2e-2, atol=2e-3)
    for p in amp.q.parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in amp.optimizer.state[p].values())


def test_a_cartpole_run_under_amp_learns_exactly_what_fp32_learns(tmp_path, tiny_cfg):
    """An MLP has no convolutions, so amp leaves its training bit for bit as it is: a seeds table under --amp is the
    float32 one."""
    from fastdqn.trainer import Trainer

    results, weights = [], []
    for amp in (False, True):
        trainer = Trainer(tiny_cfg.updated(amp=amp, eval_every=1_000), tmp_path / f"amp-{amp}", show_progress=False)
        results.append(trainer.run())
        weights.append([p.detach().clone() for p in trainer.learner.q.parameters()])
    assert results[0].updates > 0 and len(results[0].evals) == 2
    assert results[1].evals == results[0].evals
    assert all(torch.equal(a, b) for a, b in zip(*weights))
