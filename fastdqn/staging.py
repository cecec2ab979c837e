"""Host <-> device copies of one vector step: the only data that crosses the bus in the training loop.

Everything a vector step produces (next observations, rewards, episode flags, the true next observations) is
written by numpy into one host buffer, field by field, and goes to the device in one copy. On CUDA the host buffer
is pinned and the copy non_blocking; on the CPU the device buffer is the host buffer itself, so the same code runs
without any copy. There are two buffers, used in turn: the observations of step t stay readable on the device
(acting on them, storing them as the first half of transition t+1) while step t+1 fills the other buffer. The
action vector comes back through a pinned buffer and one event wait (the loop's one sync per vector step).

Reusing a pinned buffer is safe: it is filled again two vector steps later, and every vector step waits for its
action copy, which the stream orders after all earlier copies out of that buffer.
"""

from __future__ import annotations

import numpy as np
import torch

Fields = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype) of what a vector step stages
ALIGN = 16  # bytes: each field starts at a multiple of this, so every dtype's view of it is aligned


def layout(fields: Fields) -> tuple[dict[str, tuple[int, int]], int]:
    """({name: (byte offset, byte size)}, total bytes) of the fields packed one after another."""
    offsets, end = {}, 0
    for name, (shape, dtype) in fields.items():
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offsets[name] = (end, size)
        end += -(-size // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def views(buffer: torch.Tensor, fields: Fields, offsets: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Each field as a typed tensor view of the byte buffer."""
    return {
        name: buffer[start : start + size].view(dtype).view(shape)
        for (name, (shape, dtype)), (start, size) in zip(fields.items(), offsets.values())
    }


class Staging:
    """Two byte buffers (pinned on CUDA) that carry a vector step's fields to `device` in one copy each, and a
    pinned buffer that carries the actions back.

    `separate` keeps device buffers apart from the host ones; by default on every device but the CPU, whose host
    buffers are its own. On the CPU, separate=True runs the CUDA path without pinning (what the tests check).
    """

    def __init__(self, device: torch.device, fields: Fields, separate: bool | None = None):
        self.device, self.fields = device, fields
        self.pinned = device.type == "cuda"
        offsets, total = layout(fields)
        self.host = [torch.empty(total, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(2)]
        separate = device.type != "cpu" if separate is None else separate
        self.dev = [torch.empty(total, dtype=torch.uint8, device=device) for _ in range(2)] if separate else self.host
        self.host_views = [{k: v.numpy() for k, v in views(b, fields, offsets).items()} for b in self.host]
        self.dev_views = [views(b, fields, offsets) for b in self.dev]
        self.turn = 0
        self.actions: torch.Tensor | None = None
        self.done = torch.cuda.Event() if self.pinned else None

    def fill(self) -> dict[str, np.ndarray]:
        """numpy views of the buffer whose turn it is, for the vector step to write its fields into."""
        return self.host_views[self.turn]

    def send(self) -> dict[str, torch.Tensor]:
        """Copy the filled buffer to the device in one copy (none on the CPU); returns the fields there, which
        stay valid until the next call but one."""
        host, dev = self.host[self.turn], self.dev[self.turn]
        if dev is not host:
            dev.copy_(host, non_blocking=self.pinned)
        out, self.turn = self.dev_views[self.turn], 1 - self.turn
        return out

    def to_host(self, tensor: torch.Tensor) -> np.ndarray:
        """A numpy copy of a device tensor (the actions); on CUDA waits only for the work queued before this copy."""
        if self.done is None:  # not pinned: a CPU tensor
            return tensor.numpy()
        if self.actions is None or self.actions.shape != tensor.shape or self.actions.dtype != tensor.dtype:
            self.actions = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.actions.copy_(tensor, non_blocking=True)
        self.done.record(torch.cuda.current_stream(self.device))  # the copy's stream, also if cuda:N is not current
        self.done.synchronize()
        return self.actions.numpy().copy()
