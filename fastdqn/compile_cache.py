"""Where torch.compile keeps what it compiled, so that the second run of a config on a machine starts its first
compiled update in seconds instead of compiling again.

TorchInductor caches compiled graphs in `TORCHINDUCTOR_CACHE_DIR` (torch's default is `/tmp/torchinductor_$USER`,
which a reboot empties). fastdqn keeps them in `~/.cache/fastdqn/torch-compile` (`$XDG_CACHE_HOME` respected)
unless that variable is set.

On a CPU, inductor also checks in every process which SIMD instruction sets (AVX2, AVX512...) its C++ compiler can
build and load, by compiling a probe and loading it in a fresh Python for each one: about a second. fastdqn runs
that check once per machine (torch version, compiler and CPU flags) and keeps its outcome beside the cache. When
every instruction set the CPU reports passed, later runs tell inductor so (`cpp.vec_isa_ok`) instead of probing
again; the first run sets it too, after its own check, so every run's compile cache key is the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
ISA_RECORD = "fastdqn-vec-isa.json"


def default_cache_dir() -> Path:
    """~/.cache/fastdqn/torch-compile, or under $XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastdqn" / "torch-compile"


def cache_dir() -> Path:
    """The compile cache this process uses: TORCHINDUCTOR_CACHE_DIR when set, else fastdqn's default (which is then
    set, so that torch uses it too), else, where that cannot be made (a read-only home), torch's own default."""
    if not os.environ.get(CACHE_ENV):
        try:
            default_cache_dir().mkdir(parents=True, exist_ok=True)
            os.environ[CACHE_ENV] = str(default_cache_dir())
        except OSError:
            from torch._inductor.runtime.cache_dir_utils import cache_dir as torch_cache_dir

            return Path(torch_cache_dir())  # which sets the variable itself
    return Path(os.environ[CACHE_ENV])


def prepare(device: torch.device) -> None:
    """Point torch.compile at the cache and, on an x86 CPU, skip inductor's per-process instruction-set probe where
    this machine passed it before. Call before the first compile."""
    cache = cache_dir()
    if device.type == "cpu" and platform.machine() in ("x86_64", "AMD64"):
        trust_checked_isa(cache)


def isa_fingerprint() -> tuple[str, list[str]]:
    """(what the probe's outcome depends on, as a digest; the instruction sets this CPU reports that inductor
    supports)."""
    from torch._inductor import cpu_vec_isa
    from torch._inductor.cpp_builder import get_cpp_compiler

    flags = cpu_vec_isa.x86_isa_checker()
    candidates = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    compiler = get_cpp_compiler()
    try:
        stamp = str(os.stat(compiler).st_mtime_ns)
    except OSError:  # a bare name found on PATH
        stamp = ""
    key = json.dumps([torch.__version__, platform.machine(), sorted(flags), compiler, stamp])
    return hashlib.sha256(key.encode()).hexdigest(), candidates


def trust_checked_isa(cache: Path) -> None:
    """Set inductor's `cpp.vec_isa_ok` when every candidate instruction set passed its probe on this machine, probing
    (inductor's own check) only where no record of it exists yet; otherwise leave inductor to probe as usual."""
    from torch._inductor import config, cpu_vec_isa

    if config.cpp.vec_isa_ok is not None:  # the user decided (TORCHINDUCTOR_VEC_ISA_OK)
        return
    try:
        key, candidates = isa_fingerprint()
    except Exception:  # no compiler: compile_or_eager has already said so
        return
    record = cache / ISA_RECORD
    try:
        saved = json.loads(record.read_text())
        passed = saved["passed"] if saved.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        passed = None
    if passed is None:
        passed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]  # inductor's probe, once per machine
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": key, "candidates": candidates, "passed": passed}))
            os.replace(tmp, record)
        except OSError:  # a read-only or full cache: the next run probes again
            with contextlib.suppress(OSError):
                tmp.unlink()
    if candidates and sorted(passed) == sorted(candidates):
        config.cpp.vec_isa_ok = True
