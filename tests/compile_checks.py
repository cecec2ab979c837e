"""Proof that code really ran compiled: every compiled-path test wraps its public update calls in `assert_compiled`.

A test that only looks at fastdqn's wrappers, or counts torch.compile calls, passes just as well when nothing
compiles: torch.compile is lazy, a function past torch's recompile limit runs eagerly with only a log line, and
a graph break runs part of the step eagerly. These checks read torch's own counters instead, so they hold
whatever way fastdqn arranges its compiled step.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch._dynamo.utils import counters

from fastdqn import compile_cache
from fastdqn.update_runner import stored_graph_steps


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def assert_compiled() -> Iterator[None]:
    """Fail unless the block compiles at least one graph, or loads one compiled and stored by an earlier run (a
    stored update step, compile_cache.py), with no graph break and no recompile.

    Dynamo's in-memory caches and the process's stored steps are emptied first, so the block must compile or load
    for itself whatever ran before it in this process (a warm on-disk cache only makes that faster). A recompile
    raises at once, so a step that would recompile on every new value, and past the limit run eagerly, fails here.
    Nothing compiled at all (compile off, a fallback to eager, torch.compiler.set_stance("force_eager")) fails at
    the end of the block.
    """
    torch._dynamo.reset()
    stored_graph_steps.cache_clear()
    graphs, loaded, breaks = _graphs(), compile_cache.uses["loaded"], Counter(counters["graph_break"])
    with torch._dynamo.config.patch(error_on_recompile=True, suppress_errors=False):
        yield
    new_breaks = Counter(counters["graph_break"]) - breaks
    assert _graphs() > graphs or compile_cache.uses["loaded"] > loaded, "nothing was compiled: the block ran eagerly"
    assert not new_breaks, f"graph breaks ran part of the compiled code eagerly: {sorted(new_breaks)}"


@contextlib.contextmanager
def assert_not_compiled() -> Iterator[None]:
    """Fail if the block compiles or loads any graph (for the paths that must fall back to eager)."""
    torch._dynamo.reset()
    stored_graph_steps.cache_clear()
    graphs, loaded = _graphs(), compile_cache.uses["loaded"]
    yield
    assert _graphs() == graphs, f"{_graphs() - graphs} graph(s) compiled where the code should run eagerly"
    assert compile_cache.uses["loaded"] == loaded, "a stored compiled step was loaded where the code should run eagerly"
