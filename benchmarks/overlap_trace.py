"""Where each loop iteration's time goes in a profiler trace of an overlapped run, and how much of the updates ran
while the envs stepped.

    fastdqn profile --env-id ALE/Pong-v5 --num-envs 96 --env-threads 1 --torch-threads 1 --train-every 96 \\
        --gradient-steps 1 --batch-size 32 --buffer-size 16000 --learning-starts 3200 --overlap always \\
        --profile-schedule "[2,2,6,1]" --run-dir runs/overlap-trace
    python benchmarks/overlap_trace.py runs/overlap-trace/profile/trace_*.json \\
        --out benchmarks/results/overlap_trace.json --copy benchmarks/results/overlap_trace.json.gz

Per profiler step (one vector step and its updates): its length, and the total of each of fastdqn's ranges in it
(`env.in_flight` spans the envs' step from its start to its end; `env.wait` is the time the loop waited for it).
`update_inside_in_flight` is the share of `learner.update` time that lies inside `env.in_flight`: 1.0 means every
update ran while the envs stepped. Open the trace in Perfetto or chrome://tracing to see the ranges on top of each
other.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

RANGES = ("act", "env.in_flight", "env.wait", "learner.update", "replay.sample", "replay.add", "target.sync")


def spans(events: list[dict], name: str) -> list[tuple[float, float]]:
    return [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == name and e.get("ph") == "X"]


def inside(span: tuple[float, float], windows: list[tuple[float, float]]) -> float:
    """Microseconds of `span` that lie inside any of `windows` (which do not overlap each other)."""
    return sum(max(0.0, min(span[1], w[1]) - max(span[0], w[0])) for w in windows)


def summarize(trace: Path) -> dict:
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("ph") == "X"
    )
    in_flight, updates = spans(events, "env.in_flight"), spans(events, "learner.update")
    rows = []
    for start, end in steps:
        row = {"step_ms": (end - start) / 1e3}
        for name in RANGES:
            row[f"{name}_ms"] = (
                sum(min(b, end) - max(a, start) for a, b in spans(events, name) if a < end and b > start) / 1e3
            )
        mine = [u for u in updates if start <= u[0] < end]
        total = sum(b - a for a, b in mine)
        row["update_inside_in_flight"] = sum(inside(u, in_flight) for u in mine) / total if total else None
        rows.append(row)
    keys = rows[0].keys() if rows else []
    mean = {k: sum(r[k] for r in rows if r[k] is not None) / max(1, sum(r[k] is not None for r in rows)) for k in keys}
    return {"trace": trace.name, "steps": rows, "mean": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="a trace_<step>.json of `fastdqn profile`")
    parser.add_argument("--out", type=Path, help="write the summary here as JSON")
    parser.add_argument("--copy", type=Path, help="keep a gzipped copy of the trace here")
    args = parser.parse_args()
    summary = summarize(args.trace)
    for k, v in summary["mean"].items():
        print(f"{k:>28}: {v:.3f}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    if args.copy:
        with args.trace.open("rb") as src, gzip.open(args.copy, "wb") as dst:
            shutil.copyfileobj(src, dst)


if __name__ == "__main__":
    main()
