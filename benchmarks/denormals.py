"""What denormal floats cost a CPU run: how many of Adam's first moments turn denormal, and Adam's step on them.

    python benchmarks/denormals.py [--steps 50000]

Trains the default CartPole config for --steps env steps with the CPU computing denormals (the flush that
`fastdqn.devices.use_device` sets is held off for this run only), counts the denormal entries of each parameter's
Adam first moment (`exp_avg`) at the end, then times the fused Adam step of five default agents' parameters with
normal moments and with denormal ones, each with flushing off and on. Writes benchmarks/results/denormals.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fastdqn import devices
from fastdqn.adam import fused_adam_
from fastdqn.bench import cpu_name
from fastdqn.config import Config
from fastdqn.trainer import Trainer

OUT_JSON = Path("benchmarks/results/denormals.json")
AGENTS = 5
SHAPES = [(AGENTS, 256, 4), (AGENTS, 256), (AGENTS, 256, 256), (AGENTS, 256), (AGENTS, 2, 256), (AGENTS, 2)]


def denormal_moments(steps: int) -> dict[str, dict[str, int]]:
    """Per parameter: entries of Adam's exp_avg that are denormal, zero, and all, after a run without flushing."""
    keep = devices.torch.set_flush_denormal
    devices.torch.set_flush_denormal = lambda on: None  # type: ignore[assignment]  # this run computes denormals
    try:
        torch.set_flush_denormal(False)
        cfg = Config(total_steps=steps, eval_every=0, checkpoint_every=0, device="cpu", torch_threads=1)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, Path(tmp) / "run", show_progress=False)
            trainer.run()
            optimizer = trainer.learner.optimizer
            counts = {}
            for (name, _), moment in zip(trainer.learner.q.named_parameters(), optimizer.exp_avgs):
                size = moment.abs()
                counts[name] = {
                    "denormal": int(((size > 0) & (size < torch.finfo(torch.float32).tiny)).sum()),
                    "zero": int((size == 0).sum()),
                    "entries": moment.numel(),
                }
    finally:
        devices.torch.set_flush_denormal = keep
    return counts


def adam_step_ms(denormal: bool, flush: bool, repeats: int = 200) -> float:
    """Best of 5 rounds, in ms, of one fused Adam step on five agents' parameters; denormal: zero gradients and
    moments of 1e-39 (which stay denormal for hundreds of steps as they decay)."""
    torch.set_flush_denormal(flush)
    params = [torch.randn(shape) for shape in SHAPES]
    grads = [torch.zeros(shape) if denormal else torch.randn(shape) for shape in SHAPES]
    fill = 1e-39 if denormal else 1e-3
    exp_avgs = [torch.full(shape, fill) for shape in SHAPES]
    exp_avg_sqs = [torch.full(shape, fill) for shape in SHAPES]
    steps = [torch.ones(()) for _ in SHAPES]
    lr = torch.tensor(1e-3)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, (0.9, 0.999), 1e-8)
        best = min(best, (time.perf_counter() - start) / repeats * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000, help="env steps of the default run whose moments count")
    parser.add_argument("--out", type=Path, default=OUT_JSON)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    moments = denormal_moments(opts.steps)
    timings = {
        f"{'denormal' if d else 'normal'} moments, flush {'on' if f else 'off'}": round(adam_step_ms(d, f), 4)
        for d in (False, True)
        for f in (False, True)
    }
    torch.set_flush_denormal(False)
    result = {
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "threads": 1},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": opts.steps,
        "exp_avg_after_run": moments,
        "fused_adam_step_ms_five_agents": timings,
    }
    opts.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
