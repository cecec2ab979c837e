"""The compiled-path proof itself: `assert_compiled` passes only for code that compiled once and ran compiled.

These use torch.compile's "eager" backend (dynamo traces, nothing is code-generated), so they take milliseconds.
"""

from __future__ import annotations

import pytest
import torch

from compile_checks import assert_compiled, assert_not_compiled


def double(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    return x * scale


def test_a_compiled_function_passes():
    compiled = torch.compile(double, backend="eager")
    with assert_compiled():
        for _ in range(3):
            compiled(torch.ones(3))


def test_the_block_compiles_again_whatever_ran_before():
    """A graph that an earlier test left in dynamo's cache is dropped: the block's own call compiles (and so
    passes), whatever order the tests run in."""
    compiled = torch.compile(double, backend="eager")
    compiled(torch.ones(3))
    with assert_compiled():
        compiled(torch.ones(3))


def test_eager_code_fails():
    with pytest.raises(AssertionError, match="nothing was compiled"):
        with assert_compiled():
            double(torch.ones(3))


def test_forced_eager_fallback_fails():
    compiled = torch.compile(double, backend="eager")
    with pytest.raises(AssertionError, match="nothing was compiled"):
        with torch.compiler.set_stance("force_eager"), assert_compiled():
            compiled(torch.ones(3))


def test_a_recompile_fails_at_once():
    """A Python float that changes between calls recompiles each time (and past the limit would run eagerly)."""
    compiled = torch.compile(double, backend="eager")
    with pytest.raises(torch._dynamo.exc.RecompileError):
        with assert_compiled():
            for scale in (2.0, 3.0):
                compiled(torch.ones(3), scale)


def test_a_graph_break_fails():
    def with_a_break(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        torch._dynamo.graph_break()
        return y * 2

    compiled = torch.compile(with_a_break, backend="eager")
    with pytest.raises(AssertionError, match="graph breaks"):
        with assert_compiled():
            compiled(torch.ones(3))


def test_assert_not_compiled_catches_a_compile():
    with assert_not_compiled():
        double(torch.ones(3))
    compiled = torch.compile(double, backend="eager")
    with pytest.raises(AssertionError, match="1 graph"):
        with assert_not_compiled():
            compiled(torch.ones(3))
