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

On a CPU the update step itself is stored there too (`StoredSteps`): compiled ahead of time, keyed by torch's
version, fastdqn's source, the shapes of its arguments and the config fields it reads, and loaded by a later run
instead of traced and compiled again. Deleting the folder makes the next run compile afresh.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastdqn.config import Config

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


# --- the update step, compiled ahead of time and stored (CPU) ----------------------------------------------------
STEPS_DIR = "fastdqn-steps"
# Config fields the update step never reads: they do not key a stored step. Every other field does, so that a value
# the step bakes into its graph (gamma, the loss...) can never come from another config: a stored step keeps guards
# on its tensors' shapes and types, not on such values.
NOT_IN_STEP = frozenset(
    {
        "seed",
        "agents",
        "total_steps",
        "learning_starts",
        "train_every",
        "gradient_steps",
        "learning_rate",
        "lr_schedule",
        "lr_end",
        "target_update_interval",
        "epsilon_schedule",
        "epsilon_start",
        "epsilon_end",
        "epsilon_decay_steps",
        "epsilon_step_factor",
        "eval_every",
        "eval_episodes",
        "eval_epsilon",
        "solved_return",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "save_replay",
        "env_restarts",
        "env_step_timeout",
        "nonfinite_skips",
        "torch_threads",
        "overlap",
        "profile",
        "profile_schedule",
        "compile_strict",
    }
)
uses: Counter[str] = Counter()  # stored steps "loaded" from disk and "compiled" (and stored) by this process


@functools.cache
def source_digest() -> str:
    """A digest of fastdqn's own source: a stored step is compiled code of its version, never of another."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def signature(x: Any) -> Any:
    """What of an argument a compiled step depends on, as JSON: shapes and types of tensors, the structure of
    modules, the config fields the step reads."""
    if isinstance(x, torch.Tensor):
        return ["tensor", list(x.shape), str(x.dtype), x.device.type, x.requires_grad]
    if isinstance(x, torch.nn.Module):
        return ["module", repr(x), [signature(t) for t in (*x.parameters(), *x.buffers())]]
    if isinstance(x, Config):
        return ["config", {k: v for k, v in x.to_dict().items() if k not in NOT_IN_STEP}]
    if isinstance(x, (list, tuple)):
        return [signature(v) for v in x]
    return repr(x)


def step_key(mode: str, args: tuple) -> str:
    parts = [torch.__version__, mode, source_digest(), signature(args)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


class StoredSteps:
    """`fn` compiled once per argument signature and kept: in this process, and on disk in the compile cache, so
    that a later run of the same config loads the compiled step instead of tracing and compiling it again (about
    1.5 s of a warm start on this project's CPU). torch.compile's ahead-of-time API (`aot_compile`, torch 2.13:
    experimental) does both; where it fails, the step is compiled as usual."""

    def __init__(self, fn: Callable, mode: str, root: Path | None = None):
        self.fn, self.mode, self.root = fn, mode, root  # root: where the files go (default: in the compile cache)
        self.steps: dict[str, Callable] = {}

    def for_args(self, args: tuple) -> Callable:
        """The compiled step for calls with arguments like `args`: from memory, from disk, or compiled now."""
        key = step_key(self.mode, args)
        if key in self.steps:
            return self.steps[key]
        path = (self.root or cache_dir() / STEPS_DIR) / f"{key}.bin"
        step = load_step(path, args, self.fn.__globals__)
        if step is not None:
            uses["loaded"] += 1
        else:
            step = compile_and_store(self.fn, self.mode, args, path)
        self.steps[key] = step
        return step


def warn(what: str, exc: Exception, then: str) -> None:
    """One line: what failed, the first line of why (torch's messages run to pages), what happens instead."""
    why = (str(exc).splitlines() or [""])[0]
    warnings.warn(f"{what} ({type(exc).__name__}: {why}); {then}", RuntimeWarning, stacklevel=4)


def load_step(path: Path, args: tuple, f_globals: dict[str, Any]) -> Callable | None:
    """The step stored at `path` if there is one that takes `args`, else None: nothing there, or (with a warning)
    a file that cannot be loaded. `f_globals` are the compiled function's module globals, which the stored code
    may name (torch, for one)."""
    if not path.is_file():
        return None
    from torch._guards import TracingContext, tracing

    step: Any  # torch._dynamo.aot_compile.AOTCompiledFunction
    try:
        # torch 2.13 installs the stored guards as it reads them, which needs a tracing context to put them in
        with path.open("rb") as f, tracing(TracingContext(None)):
            step = torch.compiler.load_compiled_function(f, f_globals=f_globals)
        if not step.guard_check(*args):
            raise ValueError("its guards refuse these arguments")
    except Exception as exc:  # a file of another torch build, cut short, unreadable...
        warn(f"the stored compiled step {path.name} could not be loaded", exc, "compiling it again")
        return None
    step.disable_guard_check()  # the key covers what the guards check; the step is called per update
    return step


def compile_and_store(fn: Callable, mode: str, args: tuple, path: Path) -> Callable:
    """`fn` compiled ahead of time for `args` and written to `path` (atomically; a failed write only costs the
    next run its compile), or lazily by torch.compile where the ahead-of-time API fails."""
    compiled: Any = torch.compile(fn, mode=mode, fullgraph=True)
    try:
        step = compiled.aot_compile((args, {}))
    except Exception as exc:
        warn(
            "compiling the update step ahead of time failed",
            exc,
            "compiling it as usual, so later runs compile it again",
        )
        return torch.compile(fn, mode=mode)
    uses["compiled"] += 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        step.save_compiled_function(str(path))
    except Exception:  # an unwritable cache, or a step torch cannot serialize: only the next run compiles again
        pass
    step.disable_guard_check()  # as for a loaded step: the key covers what the guards check
    return step
