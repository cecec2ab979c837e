"""Capturing a function's CUDA work into a CUDA graph, so that a failed capture leaves the process as it was.

torch.cuda.graph, the context manager, leaves two things behind when a capture fails (an op that syncs with the
host, a kernel that cannot be captured): its exit calls capture_end first, which raises on an invalidated capture,
so the capture stream stays the current stream; and the device's default random generator never leaves capture
mode, so the next random op outside a graph raises ('Offset increment outside graph capture'). `capture` ends the
capture itself, restores the current stream and the generator's pre-capture state, and raises CaptureError, after
which the caller can run the same function uncaptured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class CaptureError(RuntimeError):
    """A CUDA graph capture failed; the stream and the random generator are back as before the attempt."""


def capture(fn: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture `fn`'s CUDA work on `device` into a new graph; returns the graph and `fn`'s return value, whose
    tensors every `graph.replay()` rewrites in place (read them before the next replay).

    `fn` should have run uncaptured a few times first (on a side stream), so that lazy initialisation (optimizer
    state, cuBLAS workspaces, compilation) does not happen during capture.
    """
    with torch.cuda.device(device):
        index = torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        before = generator.clone_state()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):  # restores the current stream however the block ends
                graph.capture_begin()
                try:
                    out = fn()
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # an invalidated capture raises again here
                        graph.capture_end()
                    raise
                graph.capture_end()
        except Exception as exc:
            generator.graphsafe_set_state(before)  # out of capture mode, at its offset before the attempt
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CaptureError(first) from exc
        torch.cuda.current_stream().wait_stream(stream)
        return graph, out


def on_side_stream(fn: Callable[[], T], device: torch.device) -> T:
    """Run `fn` on a fresh side stream ordered after, and before, the current stream's work (warm-up before a
    capture, as torch's CUDA graph documentation asks)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out
