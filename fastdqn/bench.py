"""`fastdqn bench`: speed of the update-step variants, the replay buffer and whole training runs.

In-process suites (update-mlp, update-cnn, replay, and loop: the training loop's own time per vector step without
the envs' step and the updates; `fastdqn.bench_suites`) report each case's median and its speed-up over the
suite's baseline measured in the same run. Training suites (e2e, cleanrl, and overlap: Pong with env stepping
sequential or overlapped with the updates; `fastdqn.bench_training`) run every training run as a process of its
own and report the whole run, the time to the first update and the steady-state rate separately. Results go to
rich tables, to JSON under benchmarks/results/ (machine, load, versions, options, configs, every sample) and to a
Markdown copy of the tables beside it. torch is imported only when an in-process suite runs, so the command starts
fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fastdqn.bench_cases import RUN_FIELDS, TRAIN_VARIANTS, VARIANTS, Case, TrainingCase
from fastdqn.errors import ConfigError
from fastdqn.logs import console

IN_PROCESS = ("update-mlp", "update-cnn", "replay", "loop")
TRAINING = ("e2e", "cleanrl", "overlap", "population")
SUITES = IN_PROCESS + TRAINING
# Env steps and warm-up steps of a training run when --steps / --learning-starts are not given: the cleanrl
# suite takes dqn.py's learning_starts and enough steps after it for a steady state.
SCHEDULES = {
    "e2e": (20_000, 2_000),
    "cleanrl": (50_000, 10_000),
    "overlap": (32_000, 3_200),
    "population": (50_000, 1_000),
}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def micro_rows(cases: list[Case]) -> tuple[list[str], list[list[str]]]:
    columns = ["suite", "case", "median", "per second", "spread (min - max)", "speed-up", "vs"]
    rows = [
        [
            c.suite,
            c.name,
            f"{fmt_time(c.median)} / {c.unit}",
            f"{1 / c.median:,.0f}",
            f"{fmt_time(min(c.samples))} - {fmt_time(max(c.samples))}",
            f"{c.speedup:.2f}x" if c.speedup is not None else "-",
            c.baseline or "-",
        ]
        for c in cases
    ]
    return columns, rows


def training_rows(cases: list[TrainingCase]) -> tuple[list[str], list[list[str]]]:
    """Medians over the runs, min - max beside them; speed-ups are ratios of medians against the suite's first
    case (whole run: its time over this one's; steady state: this one's rate over its)."""
    columns = [
        "suite",
        "case",
        "runs",
        "whole run (s)",
        "CPU (s)",
        "first update (s)",
        "steady env steps/s",
        "reported env steps/s",
        "whole-run speed-up",
        "steady speed-up",
    ]
    base = {c.suite: c for c in reversed(cases) if c.name == c.baseline}
    rows = []
    for c in cases:
        b = base[c.suite]
        (w0, w1), (s0, s1) = c.spread("whole_s"), c.spread("steady_sps")
        rows.append(
            [
                c.suite,
                c.name,
                str(len(c.runs)),
                f"{c.median('whole_s'):.1f} ({w0:.1f} - {w1:.1f})",
                f"{c.median('cpu_s'):.1f}",
                f"{c.median('first_update_s'):.2f}",
                f"{c.median('steady_sps'):,.0f} ({s0:,.0f} - {s1:,.0f})",
                f"{c.median('reported_sps'):,.0f}",
                f"{b.median('whole_s') / c.median('whole_s'):.2f}x",
                f"{c.median('steady_sps') / b.median('steady_sps'):.2f}x",
            ]
        )
    return columns, rows


def rich_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    out = Table(title=title)
    for column in columns:
        out.add_column(column, justify="left" if column in ("suite", "case", "vs") else "right")
    for row in rows:
        out.add_row(*row)
    return out


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    align = ["---" if c in ("suite", "case", "vs") else "---:" for c in columns]
    return "\n".join("| " + " | ".join(r) + " |" for r in [columns, align, *rows]) + "\n"


def machine() -> dict[str, Any]:
    """Where and under what load the benchmark ran (load averages over 1, 5 and 15 minutes)."""
    threads = {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "thread_env": threads,
    }


def write_results(
    micro: list[Case], training: list[TrainingCase], record: dict[str, Any], opts: argparse.Namespace
) -> Path:
    """benchmarks/results/bench-<time>.json (every sample) and bench-<time>.md (the tables)."""
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    record = {
        **record,
        "time": stamp,
        "options": {k: v for k, v in vars(opts).items() if k != "func"},
        "run_fields": RUN_FIELDS,
        "machine_after": machine(),
        "cases": [{**asdict(c), "median": c.median} for c in micro],
        "training": [{**asdict(c), "medians": {k: c.median(k) for k in RUN_FIELDS}} for c in training],
    }
    path.write_text(json.dumps(record, indent=2))
    path.with_suffix(".md").write_text(markdown_tables(micro, training))
    return path


def markdown_tables(micro: list[Case], training: list[TrainingCase]) -> str:
    """The tables of a bench run in Markdown, as docs/performance.md quotes them."""
    tables = []
    if micro:
        tables.append(markdown_table(*micro_rows(micro)))
    if training:
        tables.append(markdown_table(*training_rows(training)))
    return "\n".join(tables)


def schedule(suite: str, opts: argparse.Namespace) -> argparse.Namespace:
    """opts with --steps and --learning-starts filled in for a training suite."""
    steps, starts = SCHEDULES[suite]
    return argparse.Namespace(
        **{
            **vars(opts),
            "steps": opts.steps or steps,
            "learning_starts": starts if opts.learning_starts is None else opts.learning_starts,
        }
    )


def check(opts: argparse.Namespace) -> None:
    problems = [
        (opts.rounds >= 1, "--rounds must be >= 1"),
        (opts.iters >= 1, "--iters must be >= 1"),
        (opts.warmup >= 0, "--warmup must be >= 0"),
        (opts.repeats >= 1, "--repeats must be >= 1"),
        (opts.threads >= 0, "--threads must be >= 0 (0 = each process's own default)"),
        (all(n >= 0 for n in opts.cleanrl_threads), "--cleanrl-threads takes counts >= 0, e.g. 0,1"),
        (all(n >= 1 for n in opts.envs), "--envs takes positive env counts, e.g. 1,16,64"),
        (opts.overlap_envs >= 1, "--overlap-envs must be >= 1"),
        (min(opts.agents) >= 1, "--agents must list agent counts >= 1"),
        (min(opts.agent_threads) >= 1, "--agent-threads must list thread counts >= 1"),
        (
            opts.clock == "wall" or (opts.threads == 1 and opts.device == "cpu"),
            "--clock cpu measures one CPU thread: add --device cpu --threads 1, or use --clock wall",
        ),
    ]
    for suite in set(opts.suite) & set(TRAINING):
        s = schedule(suite, opts)
        problems.append(
            (
                s.steps > s.learning_starts >= 0,
                f"{suite}: --steps ({s.steps}) must be larger than --learning-starts ({s.learning_starts})",
            )
        )
    if "cleanrl" in opts.suite:
        from fastdqn.bench_training import check_cleanrl

        check_cleanrl(opts)
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)


def run(opts: argparse.Namespace) -> tuple[list[Case], list[TrainingCase], Path]:
    """Run the chosen suites; print the tables and write the JSON and Markdown."""
    check(opts)
    record: dict[str, Any] = {"machine": machine()}
    micro: list[Case] = []
    training: list[TrainingCase] = []
    wide = Console(stderr=True, width=max(console.width, 200))  # the tables are unreadable folded to 80 columns
    in_process = [s for s in opts.suite if s in IN_PROCESS]
    if in_process:
        micro, record["in_process"] = run_in_process(in_process, opts)
        wide.print(
            rich_table(
                f"fastdqn bench: {record['in_process']['device']}, torch {record['in_process']['torch']}",
                *micro_rows(micro),
            )
        )
    for suite in (s for s in opts.suite if s in TRAINING):
        from fastdqn.bench_training import bench_training, interpreter

        record.setdefault("fastdqn_interpreter", interpreter(sys.executable))
        console.print(f"[bold]bench[/] {suite}: every run a new process ...")
        training += bench_training(suite, schedule(suite, opts))
    if training:
        wide.print(
            rich_table(
                "fastdqn bench: training runs, each a new process (medians, min - max)", *training_rows(training)
            )
        )
    path = write_results(micro, training, record, opts)
    console.print(f"results written to {path} and {path.with_suffix('.md').name}")
    return micro, training, path


def run_in_process(suites: list[str], opts: argparse.Namespace) -> tuple[list[Case], dict[str, Any]]:
    """The update and replay suites, in this process, with --threads torch threads."""
    import torch

    from fastdqn import bench_suites as S
    from fastdqn.devices import resolve_device

    device = resolve_device(opts.device)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    cases: list[Case] = []
    for suite in suites:
        console.print(f"[bold]bench[/] {suite} on {device} ...")
        if suite == "replay":
            cases += S.bench_replay(device, opts)
        elif suite == "loop":
            cases += S.bench_loop(device, opts)
        else:
            cases += S.bench_update(suite, device, opts.variants, opts)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    )
    return cases, {"device": name, "device_type": device.type, "torch": torch.__version__}


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
    parser.add_argument(
        "--suite",
        type=comma_list(SUITES),
        default=["update-mlp", "replay", "e2e"],
        help=f"comma list of {', '.join(SUITES)} (default: update-mlp,replay,e2e; cleanrl needs "
        "--cleanrl-script and --cleanrl-python)",
    )
    parser.add_argument(
        "--variants",
        type=comma_list(tuple(VARIANTS)),
        default=list(VARIANTS),
        help="update-step variants; the first is the baseline (cuda-graph needs CUDA)",
    )
    parser.add_argument(
        "--train-variants",
        type=comma_list(tuple(TRAIN_VARIANTS)),
        default=["eager"],
        help="e2e/cleanrl: fastdqn's cases once for each of these update variants",
    )
    parser.add_argument(
        "--compile-cache",
        type=comma_list(("cold", "warm")),
        default=["cold"],
        help="compiled training cases: cold = an empty TorchInductor cache each run (a first run's "
        "compile), warm = the cache of the case's previous runs; a case for each listed",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the in-process suites and of fastdqn's training runs; 0 = their "
        "defaults (fastdqn's torch_threads config key, 1). CleanRL keeps torch's default",
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per update/replay case (median taken)")
    parser.add_argument("--iters", type=int, default=200, help="calls per round (update-cnn: a tenth)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed calls per update/replay case first (compiles, captures)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per training case (e2e, cleanrl, overlap), the cases taking turns (median taken)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="env steps per training run (default: e2e 20,000; cleanrl 50,000; overlap 32,000)",
    )
    parser.add_argument(
        "--learning-starts",
        type=int,
        default=None,
        help="warm-up env steps of those runs (default: e2e 2,000; cleanrl 10,000, dqn.py's; overlap 3,200)",
    )
    parser.add_argument(
        "--envs", type=int_list, default=[1, 16, 64], help="env counts of the e2e suite; the first is the baseline"
    )
    parser.add_argument(
        "--overlap-envs",
        type=int,
        default=96,
        help="Pong envs of the overlap suite, one update per vector step of them (96 balance env "
        "stepping and the update on a 2-core CPU; see fastdqn.bench_training.overlap_cases)",
    )
    parser.add_argument(
        "--agents",
        type=int_list,
        default=[1, 5],
        help="population suite: agent counts (--agents K in one process, the default CartPole config); the first, "
        "with the first of --agent-threads, is the baseline",
    )
    parser.add_argument(
        "--agent-threads",
        type=int_list,
        default=[1, 2],
        help="population suite: torch threads of each population of more than one agent (a single agent runs "
        "with the config's, 1, its fastest)",
    )
    parser.add_argument("--cleanrl-script", help="CleanRL's dqn.py in a CleanRL checkout (cleanrl/dqn.py)")
    parser.add_argument("--cleanrl-python", help="the python of the environment CleanRL's dqn.py runs in")
    parser.add_argument(
        "--cleanrl-threads",
        type=int_list,
        default=[0],
        help="a CleanRL case for each: 0 = torch's default threads (dqn.py sets none), N = run it "
        "with OMP_NUM_THREADS=N; the first is the suite's baseline",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="update/replay suites: wall time, or this process's CPU time (less sensitive to other "
        "load on a shared CPU; CPU device with --threads 1 only)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown results")
