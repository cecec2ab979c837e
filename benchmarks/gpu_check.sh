#!/usr/bin/env bash
# GPU evidence in one run of under 8 minutes: the CUDA tests, `fastdqn bench`, CartPole runs to 50k env steps, 1 and 64 agents, the
# MinAtar suite and a Pong run with a fixed wall-clock budget, each stage its own process with its own time limit, every result in
# one JSON under --out (default benchmarks/results/). `--dry-run` runs CPU-sized stages on any machine.
# Options: --out DIR, --budget SECONDS, --only STAGE,..., --dry-run. $PYTHON picks the interpreter (default python3).
# The stages and what each measures: benchmarks/gpu_check.py.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
