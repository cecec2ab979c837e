"""Which device a run trains on, and the process-wide settings that go with it."""

from __future__ import annotations

import ctypes

import torch

from fastdqn.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present. CUDA devices come back with their index (cuda -> cuda:0 on a
    one-GPU machine), so tensors' devices compare equal to it; asking for a GPU that is not there is a
    DeviceError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' was asked for but no CUDA GPU is available: use --device cpu")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DeviceError(
            f"device '{name}' was asked for but this machine has {count} CUDA GPU(s): use "
            f"cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}"
        )
    return torch.device("cuda", index)


# glibc's mallopt parameters, and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks under 32 MB come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # freed heap memory kept up to 1 GB instead of going back to the OS


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks of up to 32 MB instead of giving them back to the OS; returns whether it
    could (False on other C libraries, which this leaves alone).

    PyTorch's CPU tensors come from malloc. glibc maps a large block afresh from the OS for each allocation (from
    128 KB on, a bound it raises as such blocks are freed) and gives freed memory at the top of the heap back once it
    exceeds a small threshold, so a tensor of a few MB made every update, such as a population's activations, is
    often new memory that page-faults in on first touch. Five default CartPole agents' updates ran 1.14x as fast with
    blocks reused, and 1.76x as slow with every one mapped afresh (`python benchmarks/freed_memory.py`).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or one without mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def use_device(device: torch.device, tf32: bool) -> None:
    """Make the CPU flush denormal floats to zero and malloc keep freed memory (`keep_freed_memory`); make `device`
    the current CUDA device and set float32 matmul and convolution precision (CUDA only).

    Denormals: Adam's first moment of a weight whose gradient stays zero (a dead ReLU unit) decays by beta1 each
    step through the denormal range, where x86 CPUs compute many times slower: after a default CartPole run 41% of
    the hidden layer's moments were denormal, and the fused Adam step on denormal moments took 33x its normal time
    (`python benchmarks/denormals.py`). Flushed, such a moment is 0 a few hundred steps earlier, where its update
    (below 1e-31) changed nothing anyway. CUDA computes denormals at full speed; this setting is
    the CPU's only.

    The current device matters beyond the tensors: new streams, events and the CUDA graph capture's random
    generator belong to it, so with cuda:1 and the current device left at cuda:0 they would sit on another GPU.
    TF32 uses tensor cores for float32 matmuls (10-bit mantissa); off, both matmuls and cuDNN convolutions run in
    full float32 (PyTorch's own default turns TF32 on for convolutions only). The legacy setters are used on
    purpose: mixing them with the per-backend `fp32_precision` API makes torch's own getters raise.
    """
    torch.set_flush_denormal(True)
    keep_freed_memory()
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
