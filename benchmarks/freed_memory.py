"""What glibc's malloc giving memory back to the OS costs a population's updates.

    python benchmarks/freed_memory.py [--rounds 3] [--agents 1 5]

Times a training phase's updates (64 of batch 64, the default CartPole config) of a population of K default agents
(2 torch threads for K > 1, 1 for one agent, as `fastdqn bench --suite population` runs them), each measurement in
a process of its own with malloc set one of three ways: `default` (glibc's own: large blocks mapped afresh from the
OS, from 128 KB on, a bound glibc raises as such blocks are freed), `kept` (`fastdqn.devices.keep_freed_memory`, what
every run sets: blocks under 32 MB reused) and `fresh` (every block from 128 KB on mapped afresh: what a fixed
128 KB bound does). The processes of a round take turns, so machine noise falls on every mode alike. Writes
benchmarks/results/freed_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT_JSON = Path("benchmarks/results/freed_memory.json")
MODES = ("default", "kept", "fresh")
PHASE = 64  # updates per training phase of the default config


def measure(mode: str, agents: int, phases: int = 8) -> float:
    """Median ms per update (all agents at once) over `phases` phases, with malloc set as `mode` says."""
    import torch

    from fastdqn import devices
    from fastdqn.config import Config
    from fastdqn.population import Population

    keep = devices.keep_freed_memory
    devices.keep_freed_memory = lambda: False  # type: ignore[assignment]  # the run leaves malloc as set here
    if mode == "kept":
        assert keep(), "this benchmark needs glibc's malloc"
    elif mode == "fresh":
        assert ctypes.CDLL(None).mallopt(devices.M_MMAP_THRESHOLD, 128 << 10), "this benchmark needs glibc's malloc"
    cfg = Config(device="cpu", agents=agents, torch_threads=2 if agents > 1 else 1)
    with tempfile.TemporaryDirectory() as tmp:
        population = Population(cfg, Path(tmp) / "run", show_progress=False)
        for _ in range(300):  # 300 vector steps of every agent's envs fill its replay past the batch size
            for trainer in population.trainers:
                trainer.collector.collect()
        list(population.stacked.steps(PHASE))  # warm-up phase
        times = []
        for _ in range(phases):
            start = time.perf_counter()
            list(population.stacked.steps(PHASE))
            times.append((time.perf_counter() - start) / PHASE * 1e3)
        population.close()
    torch.set_num_threads(1)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "AGENTS"), help=argparse.SUPPRESS)  # one process's
    opts = parser.parse_args()
    if opts.measure:
        print(json.dumps(measure(opts.measure[0], int(opts.measure[1]))))
        return
    runs: dict[str, list[float]] = {}
    for _ in range(opts.rounds):
        for agents in opts.agents:
            for mode in MODES:
                done = subprocess.run(
                    [sys.executable, __file__, "--measure", mode, str(agents)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.setdefault(f"{agents}/{mode}", []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for agents in opts.agents:
        default = statistics.median(runs[f"{agents}/default"])
        for mode in MODES:
            ms = statistics.median(runs[f"{agents}/{mode}"])
            rows.append(
                {
                    "agents": agents,
                    "malloc": mode,
                    "ms_per_update": round(ms, 3),
                    "rounds": [round(x, 3) for x in runs[f"{agents}/{mode}"]],
                    "vs_default": round(default / ms, 3),
                }
            )
            print(f"{agents} agent(s), malloc {mode}: {ms:.3f} ms per update ({default / ms:.2f}x default)")
    from fastdqn.bench import cpu_name

    record = {
        "command": "python benchmarks/freed_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "glibc": platform.libc_ver()[1]},
        "what": f"median ms per update of {PHASE}-update phases, default CartPole config, each median over rounds",
        "rows": rows,
    }
    OUT_JSON.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
