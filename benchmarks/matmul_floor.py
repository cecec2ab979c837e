"""How fast the matrix products of an update can possibly run on this machine, against three speed goals.

An MLP update's matrix products are fixed by its shapes: the forward passes (online on s, target on s', and the
online net on s' for Double DQN) and the backward pass (weight gradients of every layer, input gradients of all but
the first). This script counts their multiply-adds, times fp32 matrix products of the update's own largest shape on
1 and 2 torch threads, and divides: the seconds a run would spend in matrix products alone if nothing else cost
anything. Set beside what a goal allows, that says whether eager PyTorch (whose per-op dispatch comes on top) could
reach it on this CPU. The same products in bf16 are timed beside them: what reduced-precision products would allow
(where the CPU has native bf16, AVX512-BF16 or AMX, they are several times faster).

What the goals allow comes from measurements of the same machine: SB3's whole Acrobot run from
`benchmarks/sb3_speed.py`'s JSON, one default agent's whole run from a `fastdqn bench --suite population` JSON.

    python benchmarks/matmul_floor.py [--sb3 sb3_speed-acrobot.json] [--population bench-....json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastdqn.bench import cpu_name
from fastdqn.config import Config

RESULTS = Path(__file__).resolve().parent / "results"


def update_flops(dims: list[int], batch: int, double_dqn: bool) -> float:
    """Floating-point operations (2 per multiply-add) of the matrix products of one update of an MLP `dims`."""
    forward = sum(a * b for a, b in zip(dims, dims[1:]))
    input_grads = sum(a * b for a, b in zip(dims[1:], dims[2:]))  # no input gradient of the first layer
    passes = 3 if double_dqn else 2
    return 2.0 * batch * (passes * forward + forward + input_grads)


def gemm_rate(
    rows: int, inner: int, cols: int, threads: int, seconds: float = 2.0, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of `addmm` of (rows x inner) @ (inner x cols) in `dtype` on `threads` torch threads."""
    torch.set_num_threads(threads)
    a, w, b = (torch.randn(*shape, dtype=dtype) for shape in ((rows, inner), (cols, inner), (cols,)))
    for _ in range(50):
        torch.addmm(b, a, w.t())
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            torch.addmm(b, a, w.t())
        n += 20
    return 2.0 * rows * inner * cols * n / (time.perf_counter() - start)


def goals(acrobot_sb3_s: float, one_agent_s: float) -> list[dict]:
    """The goals, each with the updates it runs and the seconds it allows for the whole run."""
    default = Config()
    per_agent = (default.total_steps - default.learning_starts) // default.train_every * default.gradient_steps
    return [
        {
            "goal": "Acrobot-v1 at rl-zoo's hyperparameters in a third of SB3's time",
            "dims": [6, 256, 256, 3],
            "batch": 128,
            "double_dqn": False,
            "updates": 100_000,
            "threads": 1,  # SB3's run had one torch thread
            "allowed_s": acrobot_sb3_s / 3,
        },
        {
            "goal": "5 default CartPole agents in 2x the wall time of one",
            "dims": [4, *default.hidden_sizes, 2],  # CartPole: 4 observations, 2 actions
            "batch": default.batch_size,
            "double_dqn": default.double_dqn,
            "updates": 5 * per_agent,
            "threads": 2,
            "allowed_s": 2 * one_agent_s,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sb3", default="sb3_speed-acrobot.json", help="benchmarks/sb3_speed.py's JSON, in results/")
    parser.add_argument("--population", default="bench-20261202-183919.json", help="a population bench JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "matmul_floor.json")
    args = parser.parse_args()
    sb3 = json.loads((RESULTS / args.sb3).read_text())["median_wall_s"]["sb3"]
    population = json.loads((RESULTS / args.population).read_text())
    one_agent = next(c for c in population["training"] if c["name"].startswith("1 agent"))
    one_agent_s = sorted(r["whole_s"] for r in one_agent["runs"])[len(one_agent["runs"]) // 2]
    rows = []
    for goal in goals(sb3, one_agent_s):
        shape = (goal["batch"], goal["dims"][1], goal["dims"][2], goal["threads"])
        rate, bf16 = gemm_rate(*shape), gemm_rate(*shape, dtype=torch.bfloat16)
        flops = update_flops(goal["dims"], goal["batch"], goal["double_dqn"]) * goal["updates"]
        rows.append(
            {
                **goal,
                "gflop_per_s": rate / 1e9,
                "tflop": flops / 1e12,
                "matmul_floor_s": flops / rate,
                "bf16_gflop_per_s": bf16 / 1e9,
                "bf16_matmul_floor_s": flops / bf16,
            }
        )
        print(
            f"{goal['goal']}: {flops / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s ({goal['threads']} thread(s)) = "
            f"{flops / rate:.1f} s of matrix products alone ({flops / bf16:.1f} s in bf16 at {bf16 / 1e9:.0f} "
            f"GFLOP/s); the goal allows {goal['allowed_s']:.1f} s in all"
        )
    record = {
        "command": "python benchmarks/matmul_floor.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "torch": torch.__version__},
        "sources": {"sb3_wall_time": args.sb3, "one_agent": args.population},
        "goals": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
