"""torch.profiler traces of the training loop (`fastdqn train --profile`, `fastdqn profile`).

While a profile runs, methods of the run's objects are wrapped in `record_function` ranges named `env.step`,
`replay.add`, `replay.sample`, `learner.update`, `target.sync` and `act` (with a CUDA graph, `learner.update` covers
the sampling too, which runs inside the graph); `env.in_flight` spans each envs' step from its start to its end,
`env.wait` the wait for it at the end. With overlap the updates sit inside `env.in_flight` (on a CPU with sync or
native envs, `env.step` runs in the stepping thread, which the trace shows as its own row; ale-py's and async
envs step outside Python, where only `env.in_flight` and a short `env.wait` show them). Each loop iteration (one
vector step and its updates) is one profiler step, counted from the first gradient update so that the schedule's
windows see training, not warm-up. With profiling off nothing is wrapped: the loop carries no profiling code.
Output, under `<run_dir>/profile/`: `trace_<step>.json` (Chrome / Perfetto trace), `tensorboard/` (for the
TensorBoard profiler plugin) and `top_ops.txt` (the operators that took the most time).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile, record_function, schedule

from fastdqn.disk import run_write
from fastdqn.errors import DiskFull
from fastdqn.logs import console

RANGES = (
    "env.step",
    "env.in_flight",
    "env.wait",
    "replay.add",
    "replay.sample",
    "learner.update",
    "target.sync",
    "act",
)
TOP_OPS = 15


def traced(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`fn` inside a profiler range called `name`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def targets(trainer: Any) -> list[tuple[object, str, str]]:
    """(object, method, range name) for each wrapped method of a Trainer."""
    found = [
        (trainer.envs, "step", "env.step"),
        (trainer.replay, "add", "replay.add"),
        (trainer.replay, "sample", "replay.sample"),
        (trainer.learner, "sync_target", "target.sync"),
        (trainer.learner, "act", "act"),
    ]
    if hasattr(trainer.replay, "samples"):  # a phase's samples drawn at once (UpdateRunner.run in chunks)
        found.append((trainer.replay, "samples", "replay.sample"))
    # The runner's `update` is one update on a sampled batch; a graphed runner's `step` samples and updates.
    update = "step" if trainer.updates.kind == "graphed" else "update"
    return found + [(trainer.updates, update, "learner.update")]


@contextlib.contextmanager
def in_flight(stepper: Any) -> Iterator[None]:
    """`env.in_flight` from each `stepper.start` to the end of its `finish`, `env.wait` around the finish."""
    start, finish = stepper.start, stepper.finish
    open_ranges: list[record_function] = []

    def traced_start(actions: Any) -> None:
        open_ranges.append(record_function("env.in_flight").__enter__())
        start(actions)

    def traced_finish() -> Any:
        try:
            with record_function("env.wait"):
                return finish()
        finally:
            open_ranges.pop().__exit__(None, None, None)

    stepper.start, stepper.finish = traced_start, traced_finish
    try:
        yield
    finally:
        del stepper.start, stepper.finish


@contextlib.contextmanager
def instrumented(methods: list[tuple[object, str, str]]) -> Iterator[None]:
    """Wrap each (object, method) in its named range for the duration of the block, then restore it."""
    saved = [(obj, attr, vars(obj).get(attr)) for obj, attr, _ in methods]
    for obj, attr, name in methods:
        setattr(obj, attr, traced(getattr(obj, attr), name))
    try:
        yield
    finally:
        for obj, attr, own in reversed(saved):
            if own is None:
                delattr(obj, attr)  # the instance attribute goes: the class's method shows again
            else:
                setattr(obj, attr, own)


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def sort_key(device: torch.device) -> str:
    return "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"


def make_profiler(out_dir: Path, wait: int, warmup: int, active: int, repeat: int, device: torch.device) -> profile:
    """A scheduled profiler that writes a Chrome trace, a TensorBoard trace and top_ops.txt per active window."""
    tensorboard = out_dir / "tensorboard"
    with run_write(tensorboard, "the profile's dir"):
        tensorboard.mkdir(parents=True, exist_ok=True)

    def on_trace_ready(prof: profile) -> None:
        trace = out_dir / f"trace_{prof.step_num}.json"
        copy = tensorboard / f"{socket.gethostname()}_{os.getpid()}.{prof.step_num}.pt.trace.json"
        top = out_dir / "top_ops.txt"
        table = prof.key_averages().table(sort_by=sort_key(device), row_limit=TOP_OPS)
        try:
            with run_write(trace, "a profiler trace", opaque=True):  # the C++ exporter does not say why it failed
                prof.export_chrome_trace(str(trace))  # a trace can be saved once: the plugin gets a copy of the file
                check_complete(trace)
            with run_write(copy, "a profiler trace", trace.stat().st_size):
                shutil.copyfile(trace, copy)
            with run_write(top, "the profile's top operators", len(table.encode())):
                top.write_text(table)
        except DiskFull:
            for partial in (trace, copy, top, *out_dir.glob(f"{trace.name}*.tmp")):  # nothing half-written stays
                partial.unlink(missing_ok=True)
            raise

    return profile(
        activities=activities(device),
        on_trace_ready=on_trace_ready,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
        experimental_config=_ExperimentalConfig(profile_all_threads=True),
    )  # the stepping thread too


def check_complete(trace: Path) -> None:
    """Raise OSError if the exporter left `trace` empty or cut short (it logs a failed write and returns)."""
    with trace.open("rb") as f:
        f.seek(max(0, trace.stat().st_size - 64))
        if not f.read().rstrip().endswith((b"}", b"]")):
            raise OSError(f"the profiler wrote an incomplete trace '{trace}'")


@contextlib.contextmanager
def profiled(trainer: Any) -> Iterator[None]:
    """Profile a Trainer's loop when `cfg.profile` is on: the profiler starts at the first gradient update and
    every later `vector_step()` call ends one profiler step (one loop iteration)."""
    cfg = trainer.cfg
    if not cfg.profile:
        yield
        return
    out_dir = Path(trainer.run_dir) / "profile"
    wait, warmup, active, repeat = cfg.profile_schedule  # Config.validate: exactly four
    prof = make_profiler(out_dir, wait, warmup, active, repeat, device=trainer.device)
    vector_step = trainer.vector_step
    started = False

    def step_and_count() -> Any:
        nonlocal started
        finished = vector_step()
        if started:
            prof.step()
        elif trainer.counters.updates > 0:  # the schedule counts from the first gradient update
            prof.start()
            started = True
        return finished

    with instrumented(targets(trainer)), in_flight(trainer.collector.stepper):
        trainer.vector_step = step_and_count
        try:
            yield
        finally:
            del trainer.vector_step
            if started:
                prof.stop()
    top = out_dir / "top_ops.txt"
    summary = (
        top.read_text() if top.is_file() else "no profiler window completed: run more steps or lower profile_schedule"
    )
    console.print(
        f"profile written to {out_dir} (open trace_*.json in https://ui.perfetto.dev)\n{summary}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
