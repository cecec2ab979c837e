"""Device resolution, the process-wide CUDA settings and the free-memory check, with torch.cuda's answers faked on
this CPU machine (the real thing runs in test_cuda.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch

from fastdqn import devices, memory
from fastdqn.devices import resolve_device, use_device
from fastdqn.errors import DeviceError


@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda reporting `count` GPUs, the current one cuda:0; returns the setter."""

    def set_count(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    return set_count


def test_auto_and_cpu_resolve_to_the_cpu_without_a_gpu(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU is available: use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device 'gpu': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_cuda_devices_resolve_with_their_index(gpus):
    """Without an index, tensors' devices (cuda:0) would not compare equal to the run's device (cuda)."""
    gpus(2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="'cuda:2' was asked for but this machine has 2 CUDA GPU.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    gpus(1)
    with pytest.raises(DeviceError, match="has 1 CUDA GPU\\(s\\): use cuda:0$"):
        resolve_device("cuda:1")


@pytest.fixture
def restore_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_use_device_makes_the_gpu_current_and_sets_tf32(monkeypatch, restore_precision):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    cuda1 = torch.device("cuda", 1)
    use_device(cuda1, tf32=True)
    assert current == [cuda1]  # streams, events and the capture's generator then belong to cuda:1
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32  # torch's own getters agree (no mixed-API error)
    use_device(cuda1, tf32=False)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


def test_use_device_leaves_a_cpu_run_alone(monkeypatch, restore_precision):
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device on a CPU run"))
    torch.set_float32_matmul_precision("highest")
    use_device(torch.device("cpu"), tf32=True)
    assert torch.get_float32_matmul_precision() == "highest"


def test_free_cuda_memory_counts_blocks_cached_by_pytorch(monkeypatch):
    """A second run in one process finds the first one's freed memory in PyTorch's cache, which the driver
    counts as used: a buffer that fits must not be refused."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 4 * gib)
    assert memory.free_bytes(torch.device("cuda", 0)) == 28 * gib
    report = memory.check_replay_fits(20 * gib, 1_000_000, torch.device("cuda", 0))  # 26 GiB cached + 2 free
    assert report.startswith("replay: 1,000,000 transitions")


def test_use_device_flushes_denormals_on_the_cpu():
    """Adam's moments of dead ReLU units decay into the denormal range, where the fused step ran 33x slower: a run
    computes them as zero (the conftest fixture has just turned flushing off)."""
    tiny = torch.tensor([1e-39, 1e-30])  # 1e-39 is below float32's smallest normal number (1.2e-38)
    assert (tiny * 0.5)[0] > 0
    use_device(torch.device("cpu"), tf32=False)
    halved = tiny * 0.5
    assert halved[0] == 0 and halved[1] == 5e-31


# A fresh process: how much of a 4 MB tensor glibc's malloc maps afresh from the OS (mallinfo2's hblkhd, bytes in
# mapped blocks), before and after keep_freed_memory, which use_device calls.
MAPPED_4MB = """
import ctypes, json, torch
from fastdqn import devices
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                "fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
def mapped():
    before = mallinfo2().hblkhd
    tensor = torch.empty(1 << 20)  # 4 MB
    return mallinfo2().hblkhd - before
first = mapped()
kept = devices.keep_freed_memory()
print(json.dumps([first, kept, mapped()]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_makes_malloc_reuse_blocks_of_a_few_mb():
    """A population's activations are tensors of a few MB made every update; glibc maps each afresh from the OS
    (page faults on first touch) until keep_freed_memory has it take them from the heap."""
    first, kept, after = json.loads(
        subprocess.run([sys.executable, "-c", MAPPED_4MB], capture_output=True, text=True, check=True).stdout
    )
    assert first >= 4 << 20  # glibc's own setting: mapped afresh
    assert kept is True and after == 0


def test_use_device_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: calls.append(True) or True)
    use_device(torch.device("cpu"), tf32=False)
    assert calls == [True]
