"""The compile cache: where it lives, and inductor's instruction-set probe run once per machine, not per process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor import cpu_vec_isa

from fastdqn import compile_cache

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
