"""Shared test fixtures: small, fast configs on the CPU."""

from __future__ import annotations

import pytest
import torch

from fastdqn.config import Config


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests run with one torch thread so parallel agents and CI runners do not oversubscribe the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _denormals_kept():
    """Every test starts with the CPU computing denormals, as a fresh process does (a run's use_device flushes them
    from then on), so no test's numbers depend on which tests ran before it in this process."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def tiny_cfg() -> Config:
    """CartPole with a small net and short schedules: a few seconds of training at most."""
    return Config(
        total_steps=2_000,
        learning_starts=200,
        buffer_size=1_000,
        batch_size=32,
        hidden_sizes=[32, 32],
        eval_every=0,
        eval_episodes=2,
        log_every=500,
        checkpoint_every=0,
        epsilon_decay_steps=1_000,
        target_update_interval=100,
        device="cpu",
    )


def pytest_terminal_summary(terminalreporter, config) -> None:
    """Name the random test order even under -q, so that a failure that depends on it can be repeated."""
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"tests ran in a random order; repeat it with --randomly-seed={seed}")
