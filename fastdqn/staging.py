"""Host <-> device copies of one vector step: the only data that crosses the bus in the training loop.

On CUDA each named array goes through its own pinned host buffer and a non_blocking copy, and the action vector
comes back through a pinned buffer and one event wait (the loop's one sync per vector step). On the CPU the
arrays are wrapped without copies. Reusing a pinned buffer is safe because every vector step waits for its
action copy, which the stream orders after all earlier host-to-device copies from those buffers.
"""

from __future__ import annotations

import numpy as np
import torch


class Staging:
    """Copies numpy arrays to `device` and device tensors back to numpy, through pinned buffers on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers: dict[str, torch.Tensor] = {}
        self.done = torch.cuda.Event() if self.pinned else None

    def _buffer(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return buf

    def to_device(self, name: str, array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`array` on the device (as `dtype` if given); `name` keys its pinned buffer."""
        host = torch.from_numpy(np.asarray(array))
        if not self.pinned:
            return host.to(self.device, dtype or host.dtype)
        buf = self._buffer(name, host.shape, dtype or host.dtype)
        buf.copy_(host)
        return buf.to(self.device, non_blocking=True)

    def to_host(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """A numpy copy of a device tensor; on CUDA waits only for the work queued before this copy."""
        if not self.pinned:
            return tensor.numpy()
        buf = self._buffer(name, tensor.shape, tensor.dtype)
        buf.copy_(tensor, non_blocking=True)
        self.done.record(torch.cuda.current_stream(self.device))  # the copy's stream, also if cuda:N is not current
        self.done.synchronize()
        return buf.numpy().copy()
