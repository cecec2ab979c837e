"""The compile cache: where it lives, and inductor's instruction-set probe run once per machine, not per process."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor import cpu_vec_isa

from fastdqn import compile_cache
from fastdqn.config import Config
from fastdqn.learner import DQNLearner, single_graph_step
from fastdqn.replay import Batch

CANDIDATES = ["avx512", "avx2"]


@pytest.fixture
def isa_probe(monkeypatch):
    """Inductor's probe replaced by a counted stand-in over a fixed machine; `vec_isa_ok` restored after."""
    monkeypatch.setattr(compile_cache, "isa_fingerprint", lambda: ("machine-a", list(CANDIDATES)))
    probe = {"calls": 0, "passes": list(CANDIDATES)}

    def valid_vec_isa_list():
        probe["calls"] += 1
        return list(probe["passes"])

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", valid_vec_isa_list)
    with inductor_config.patch({"cpp.vec_isa_ok": None}):  # torch's own patch restores it after
        yield probe


def test_cache_dir_is_torchs_variable_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == tmp_path / "mine"


def test_cache_dir_defaults_to_fastdqns_place_and_tells_torch(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.cache_dir() == tmp_path / "fastdqn" / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "fastdqn" / "torch-compile")


def test_the_probe_runs_once_per_machine_and_its_pass_is_trusted_after(isa_probe, tmp_path):
    compile_cache.trust_checked_isa(tmp_path)  # first run: probes, records, trusts
    assert isa_probe["calls"] == 1 and inductor_config.cpp.vec_isa_ok is True
    record = json.loads((tmp_path / compile_cache.ISA_RECORD).read_text())
    assert record == {"key": "machine-a", "candidates": CANDIDATES, "passed": CANDIDATES}

    inductor_config.cpp.vec_isa_ok = None  # a later process
    compile_cache.trust_checked_isa(tmp_path)
    assert isa_probe["calls"] == 1 and inductor_config.cpp.vec_isa_ok is True


def test_an_instruction_set_that_failed_leaves_inductor_probing(isa_probe, tmp_path):
    isa_probe["passes"] = ["avx2"]  # the compiler could not build avx512 here
    for _ in range(2):
        compile_cache.trust_checked_isa(tmp_path)
        assert inductor_config.cpp.vec_isa_ok is None
    assert isa_probe["calls"] == 1  # the record holds the partial outcome; inductor probes for itself


def test_a_record_of_another_machine_or_a_broken_one_is_probed_again(isa_probe, tmp_path):
    record = tmp_path / compile_cache.ISA_RECORD
    record.write_text(json.dumps({"key": "machine-b", "candidates": CANDIDATES, "passed": CANDIDATES}))
    compile_cache.trust_checked_isa(tmp_path)
    assert isa_probe["calls"] == 1 and json.loads(record.read_text())["key"] == "machine-a"
    record.write_text("{not json")
    inductor_config.cpp.vec_isa_ok = None
    compile_cache.trust_checked_isa(tmp_path)
    assert isa_probe["calls"] == 2 and inductor_config.cpp.vec_isa_ok is True


def test_the_users_own_setting_wins(isa_probe, tmp_path):
    inductor_config.cpp.vec_isa_ok = False
    compile_cache.trust_checked_isa(tmp_path)
    assert isa_probe["calls"] == 0 and inductor_config.cpp.vec_isa_ok is False
    assert not (tmp_path / compile_cache.ISA_RECORD).exists()


def test_the_fingerprint_names_this_machines_candidates_and_changes_with_torch(monkeypatch):
    key, candidates = compile_cache.isa_fingerprint()
    flags = cpu_vec_isa.x86_isa_checker()
    assert all(all(f in flags for f in c.split()) for c in candidates)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert compile_cache.isa_fingerprint() == (compile_cache.isa_fingerprint()[0], candidates)
    assert compile_cache.isa_fingerprint()[0] != key  # an upgraded torch probes again


def test_a_cache_that_cannot_be_written_still_trusts_this_runs_probe(isa_probe, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache dir should be: mkdir fails
    compile_cache.trust_checked_isa(blocked / "cache")
    assert isa_probe["calls"] == 1 and inductor_config.cpp.vec_isa_ok is True


def test_a_home_where_the_cache_cannot_be_made_leaves_torchs_default(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # mkdir under a file fails
    chosen = compile_cache.cache_dir()
    assert chosen.is_dir() and "file" not in str(chosen)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)


# --- stored update steps -------------------------------------------------------------------------------------
def stored_cfg(**changes) -> Config:
    return Config(**{"device": "cpu", "compile": True, "hidden_sizes": [32, 32], "batch_size": 16, **changes})


def learner_of(cfg: Config) -> DQNLearner:
    torch.manual_seed(0)
    return DQNLearner(cfg, (4,), 2, torch.device("cpu"))


def step_batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [
        Batch(
            torch.randn(16, 4, generator=g),
            torch.randint(0, 2, (16,), generator=g),
            torch.randn(16, generator=g),
            torch.randn(16, 4, generator=g),
            (torch.rand(16, generator=g) < 0.1).float(),
            torch.full((16,), 0.97),
        )
        for _ in range(n)
    ]


def args_of(learner: DQNLearner, b: Batch) -> tuple:
    return (*learner.functional_state(), *b.loss_inputs())


def train_stored(steps: compile_cache.StoredSteps, cfg: Config, data: list[Batch]) -> DQNLearner:
    learner = learner_of(cfg)
    with torch.no_grad():
        step = steps.for_args(args_of(learner, data[0]))
        for b in data:
            step(*args_of(learner, b))
    return learner


def train_eager(cfg: Config, data: list[Batch]) -> DQNLearner:
    learner = learner_of(cfg)
    for b in data:
        learner.step_on(b)
    return learner


def assert_same_weights(a: DQNLearner, b: DQNLearner) -> None:
    for p, q in zip([*a.q.parameters(), *a.target.parameters()], [*b.q.parameters(), *b.target.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_stored_step_loads_in_a_later_run_and_trains_as_the_eager_one(tmp_path):
    cfg, data = stored_cfg(), step_batches(6)
    compiled_before = compile_cache.uses["compiled"]
    first = train_stored(compile_cache.StoredSteps(single_graph_step, "default", tmp_path), cfg, data)
    assert compile_cache.uses["compiled"] == compiled_before + 1 and len(list(tmp_path.glob("*.bin"))) == 1
    loaded_before = compile_cache.uses["loaded"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the stored compiled step")  # a load that fails says so
        later = train_stored(compile_cache.StoredSteps(single_graph_step, "default", tmp_path), cfg, data)  # a new run
    assert compile_cache.uses["loaded"] == loaded_before + 1 and compile_cache.uses["compiled"] == compiled_before + 1
    eager = train_eager(cfg, data)
    assert_same_weights(first, eager)
    assert_same_weights(later, eager)


def test_a_stored_step_serves_only_its_own_config_and_a_broken_one_is_compiled_again(tmp_path):
    data = step_batches(4)
    train_stored(compile_cache.StoredSteps(single_graph_step, "default", tmp_path), stored_cfg(), data)
    # gamma is baked into the graph, and a stored step keeps no guard on it: the key must keep them apart
    other = stored_cfg(gamma=0.5)
    compiled_before = compile_cache.uses["compiled"]
    learner = train_stored(compile_cache.StoredSteps(single_graph_step, "default", tmp_path), other, data)
    assert compile_cache.uses["compiled"] == compiled_before + 1
    assert_same_weights(learner, train_eager(other, data))
    for path in tmp_path.glob("*.bin"):
        path.write_bytes(b"cut short")
    with pytest.warns(RuntimeWarning, match="could not be loaded.*compiling it again"):
        learner = train_stored(compile_cache.StoredSteps(single_graph_step, "default", tmp_path), other, data)
    assert compile_cache.uses["compiled"] == compiled_before + 2
    assert_same_weights(learner, train_eager(other, data))


def test_the_key_is_the_config_the_step_reads_and_the_shapes():
    learner, b = learner_of(stored_cfg()), step_batches(1)[0]

    def key(**changes) -> str:
        other = learner_of(stored_cfg(**changes))
        return compile_cache.step_key("default", args_of(other, b))

    same = key()
    assert key(seed=7, total_steps=10, learning_rate=0.1, eval_every=5) == same  # read outside the step
    assert key(gamma=0.5) != same and key(loss="mse") != same and key(hidden_sizes=[32, 16]) != same
    half = Batch(*(t[:8] for t in b[:5]), b.discounts[:8])
    assert compile_cache.step_key("default", args_of(learner, half)) != same


def test_a_step_the_ahead_of_time_api_cannot_take_is_compiled_as_usual_with_a_warning(tmp_path):
    def with_a_break(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()  # fullgraph capture refuses this
        return y + 1

    with pytest.warns(RuntimeWarning, match="ahead of time failed.*compiling it as usual"):
        step = compile_cache.StoredSteps(with_a_break, "default", tmp_path).for_args((torch.ones(3),))
    assert torch.equal(step(torch.ones(3)), torch.full((3,), 3.0)) and not list(tmp_path.glob("*.bin"))
