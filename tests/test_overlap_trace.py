"""benchmarks/overlap_trace.py: per profiler step, the ranges' totals and the share of the updates that ran while
the envs stepped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("overlap_trace", ROOT / "benchmarks" / "overlap_trace.py")
overlap_trace = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overlap_trace)


def X(name, ts, dur):
    return {"name": name, "ph": "X", "ts": ts, "dur": dur}


def test_the_share_of_update_time_inside_the_envs_step_is_measured_per_profiler_step(tmp_path):
    events = [
        X("ProfilerStep#1", 0, 100),
        X("act", 0, 10),
        X("env.in_flight", 10, 60),
        X("learner.update", 20, 40),
        X("env.wait", 60, 10),
        X("ProfilerStep#2", 100, 100),
        X("act", 100, 10),
        X("env.in_flight", 110, 20),
        X("learner.update", 120, 40),
    ]  # the second update outlasts the envs' step by 30 of its 40 us
    trace = tmp_path / "trace_1.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    summary = overlap_trace.summarize(trace)
    first, second = summary["steps"]
    assert first["update_inside_in_flight"] == 1.0 and second["update_inside_in_flight"] == pytest.approx(0.25)
    assert (first["step_ms"], first["env.wait_ms"], second["env.in_flight_ms"]) == (0.1, 0.01, 0.02)
    assert summary["mean"]["update_inside_in_flight"] == pytest.approx(0.625)


def test_the_committed_trace_summary_is_what_the_committed_trace_gives(tmp_path):
    import gzip

    trace = tmp_path / "trace.json"
    trace.write_bytes(gzip.decompress((ROOT / "benchmarks" / "results" / "overlap_trace.json.gz").read_bytes()))
    committed = json.loads((ROOT / "benchmarks" / "results" / "overlap_trace.json").read_text())
    assert overlap_trace.summarize(trace)["mean"] == pytest.approx(committed["mean"])
