"""pytest-benchmark suites (`python -m pytest benchmarks/`): not in the default `tests/` run.

They reuse the builders of `fastdqn.bench_suites`, so `fastdqn bench` and these files time the same code.
`--benchmark-disable` runs each benchmark body once, as a smoke test (tests/test_bench_smoke.py does that).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
