"""The microbenchmarks behind three layout choices of the stacked (population) update, on this machine.

    python benchmarks/layouts.py [--rounds 5]

- `td_targets` picks Double DQN's next action with `max(dim).indices`, not `argmax`: five agents' (K, B, n_actions)
  Q-values of a batch are transposed in memory (`networks.Linear` keeps activations as (K, features, B)).
- `networks.FEW_ROWS`: stacked layers take fewer rows than this (acting, evaluation) as x W^T and a batch's rows
  as (W x^T)^T; timed here as five default agents' forward pass on 8 and 16 rows, each way.
- `learner.TARGET_PASS_FLOATS`: the most activations per layer of one chunked target pass; timed here as a
  64-update phase of five default agents (`StackedAgents.steps`) with the chunk at several sizes.

Every case runs in one process with the settings of a run (`fastdqn.devices.use_device`: denormals flushed, freed
memory reused) on 2 torch threads, as `fastdqn bench --suite population` runs five agents; the cases take turns
over `--rounds` rounds and each figure is the median. Writes benchmarks/results/layouts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastdqn import learner, networks
from fastdqn.bench import cpu_name
from fastdqn.config import Config
from fastdqn.devices import use_device
from fastdqn.population import Population

OUT_JSON = Path("benchmarks/results/layouts.json")
AGENTS = 5


def timed_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    use_device(torch.device("cpu"), tf32=False)
    torch.set_num_threads(2)
    cfg = Config(device="cpu", agents=AGENTS, torch_threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        population = Population(cfg, Path(tmp) / "run", show_progress=False)
        for _ in range(300):  # fills every agent's replay past the batch size
            for trainer in population.trainers:
                trainer.collector.collect()
        stacked = population.stacked
        q_values = stacked.q_net(stacked.sample().next_obs)  # (K, B, n_actions), transposed in memory
        cases: dict[str, Callable[[], float]] = {
            "argmax_us": lambda: timed_us(lambda: q_values.argmax(dim=-1), 2000),
            "max_indices_us": lambda: timed_us(lambda: q_values.max(dim=-1).indices, 2000),
        }
        for rows in (8, 16):
            obs = torch.randn(AGENTS, rows, 4)
            for name, few in (("x_wt", rows + 1), ("w_xt", 0)):  # FEW_ROWS above or at `rows` picks the layout

                def forward(few: int = few, obs: torch.Tensor = obs) -> float:
                    networks.FEW_ROWS = few
                    with torch.no_grad():
                        return timed_us(lambda: stacked.q_net(obs), 1000)

                cases[f"forward_{rows}_rows_{name}_us"] = forward
        for floats in (1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21):

            def phase(floats: int = floats) -> float:
                learner.TARGET_PASS_FLOATS = floats
                return timed_us(lambda: list(stacked.steps(64)), 5) / 64

            cases[f"update_us_target_pass_2^{floats.bit_length() - 1}_floats"] = phase
        runs: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(opts.rounds):
            for name, case in cases.items():
                runs[name].append(case())
        population.close()
    figures = {name: round(statistics.median(values), 1) for name, values in runs.items()}
    for name, value in figures.items():
        print(f"{name}: {value}")
    record = {
        "command": "python benchmarks/layouts.py --rounds " + str(opts.rounds),
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "threads": 2},
        "what": f"{AGENTS} default CartPole agents' stacked networks; medians over rounds, the cases taking turns",
        "medians": figures,
        "rounds": {name: [round(v, 1) for v in values] for name, values in runs.items()},
    }
    OUT_JSON.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
