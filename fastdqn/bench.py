"""`fastdqn bench`: speed of the update-step variants, the replay buffer and whole training runs, in one run.

Each suite reports every case's median and its speed-up over the suite's baseline measured in the same run:
eager for the update step, 1 env for end-to-end training, CleanRL's dqn.py for the CleanRL comparison. Results
go to a rich table and to JSON under benchmarks/results/ (device, torch version, options, configs, all samples).
This module imports torch only when a benchmark runs, so building the CLI stays fast.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fastdqn.logs import console

SUITES = ("update-mlp", "update-cnn", "replay", "e2e", "cleanrl")
VARIANT_NAMES = ("eager", "compiled", "compiled+amp", "cuda-graph")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def table(cases: list[Any], title: str) -> Table:
    out = Table(title=title)
    for column in ("suite", "case", "median", "per second", "spread (min - max)", "speed-up", "vs"):
        out.add_column(column, justify="left" if column in ("suite", "case", "vs") else "right")
    for c in cases:
        speedup = f"{c.speedup:.2f}x" if c.speedup is not None else "-"
        out.add_row(c.suite, c.name, f"{fmt_time(c.median)} / {c.unit}", f"{1 / c.median:,.0f}",
                    f"{fmt_time(min(c.samples))} - {fmt_time(max(c.samples))}", speedup, c.baseline or "-")
    return out


def write_json(cases: list[Any], device: Any, opts: argparse.Namespace) -> Path:
    """benchmarks/results/bench-<device type>-<time>.json: device, versions, options and every sample."""
    import torch

    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{device.type}-{stamp}.json"
    record = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "python": platform.python_version(), "time": stamp,
              "options": {k: v for k, v in vars(opts).items() if k != "func"},
              "cases": [{**asdict(c), "median": c.median} for c in cases]}
    path.write_text(json.dumps(record, indent=2))
    return path


def check(opts: argparse.Namespace) -> None:
    problems = [(opts.rounds >= 1, "--rounds must be >= 1"), (opts.iters >= 1, "--iters must be >= 1"),
                (opts.warmup >= 0, "--warmup must be >= 0"), (opts.repeats >= 1, "--repeats must be >= 1"),
                (opts.steps > opts.learning_starts >= 0, "--steps must be larger than --learning-starts (>= 0)"),
                (all(n >= 1 for n in opts.envs), "--envs takes positive env counts, e.g. 1,16,64"),
                (opts.clock == "wall" or (opts.threads == 1 and opts.device == "cpu"),
                 "--clock cpu measures one CPU thread: add --device cpu --threads 1, or use --clock wall")]
    for ok, message in problems:
        if not ok:
            from fastdqn.errors import ConfigError

            raise ConfigError(message)


def run(opts: argparse.Namespace) -> tuple[list[Any], Path]:
    """Run the chosen suites; print the table and write the JSON."""
    import torch

    from fastdqn import bench_suites as S
    from fastdqn.devices import resolve_device

    check(opts)
    device = resolve_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    cases: list[S.Case] = []
    for suite in opts.suite:
        console.print(f"[bold]bench[/] {suite} on {device} ...")
        if suite in ("update-mlp", "update-cnn"):
            cases += S.bench_update(suite, device, opts.variants, opts)
        elif suite == "replay":
            cases += S.bench_replay(device, opts)
        elif suite == "e2e":
            cases += S.bench_e2e(device, opts)
        else:
            cases += S.bench_cleanrl(device, opts)
    path = write_json(cases, device, opts)
    wide = Console(stderr=True, width=max(console.width, 140))  # the table is unreadable folded to 80 columns
    wide.print(table(cases, f"fastdqn bench: {device_name(device)}, torch {torch.__version__}"))
    console.print(f"results written to {path}")
    return cases, path


def comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in choices for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(choices)}, got {text!r}")
        return items

    return parse


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 1,16,64, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", type=comma_list(SUITES), default=["update-mlp", "replay", "e2e", "cleanrl"],
                        help=f"comma list of {', '.join(SUITES)} (default: all but update-cnn)")
    parser.add_argument("--variants", type=comma_list(VARIANT_NAMES), default=list(VARIANT_NAMES),
                        help="update-step variants; the first is the baseline (cuda-graph needs CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per update/replay case (median taken)")
    parser.add_argument("--iters", type=int, default=200, help="calls per round (update-cnn: a tenth)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per case first (compiles, captures)")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per e2e/cleanrl case (median taken)")
    parser.add_argument("--steps", type=int, default=20_000, help="env steps per e2e/cleanrl training run")
    parser.add_argument("--learning-starts", type=int, default=2_000, help="warm-up env steps of those runs")
    parser.add_argument("--envs", type=int_list, default=[1, 16, 64],
                        help="env counts of the e2e suite; the first is the baseline")
    parser.add_argument("--compile", action="store_true", help="e2e/cleanrl: fastdqn with --compile")
    parser.add_argument("--amp", action="store_true", help="e2e/cleanrl: fastdqn with --amp")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (less sensitive to other load on a shared "
                             "CPU; CPU device with --threads 1 only)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON results")
