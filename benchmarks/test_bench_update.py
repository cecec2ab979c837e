"""Update step per variant: CartPole MLP at batch 128, Nature CNN at batch 32 (sampling included)."""

from __future__ import annotations

import pytest

from fastdqn.bench_suites import ATARI, CARTPOLE, VARIANTS, filled_replay, synchronize, update_fn
from fastdqn.config import Config

NETS = {"mlp": (CARTPOLE, 128, 10_000), "cnn": (ATARI, 32, 2_000)}


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_update(benchmark, device, net, variant):
    if variant == "cuda-graph" and device.type != "cuda":
        pytest.skip("the CUDA-graph variant needs a CUDA device")  # benchmarks only, never in tests/
    (obs_shape, n_actions), batch_size, capacity = NETS[net]
    replay = filled_replay(obs_shape, n_actions, capacity, device)
    step = update_fn(Config(device=str(device), batch_size=batch_size), variant, obs_shape, n_actions, replay, device)
    for _ in range(5):  # compile / capture outside the timing
        step()

    def timed():
        step()
        synchronize(device)

    benchmark(timed)
