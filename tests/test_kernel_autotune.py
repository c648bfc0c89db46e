"""The one tuner every launcher uses (kernels/autotune.py), with a stubbed timer."""
from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fastpeft.kernels import autotune


@pytest.fixture
def gpu_tuner(monkeypatch):
    """The tuner as on a GPU (no interpreter, no capture), an empty cache, and a timer
    that runs each candidate once and reports ``times[candidate]`` ms."""
    times = {}
    ran = []

    def fake_bench(fn, **kwargs):
        fn()
        return times[ran[-1]]

    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(autotune, "interpreter_active", lambda: False)
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    monkeypatch.setattr(autotune.triton.testing, "do_bench", fake_bench)
    return times, ran


def test_times_every_candidate_once_and_caches_the_fastest(gpu_tuner):
    times, ran = gpu_tuner
    times.update(a=2.0, b=1.0, c=3.0)
    built = []

    def candidates():
        built.append(1)
        return ["a", "b", "c"]

    assert autotune.pick(("k", 1), ran.append, candidates) == "b"
    assert autotune.pick(("k", 1), ran.append, candidates) == "b"
    assert ran == ["a", "b", "c"] and built == [1]  # candidates built on the miss only
    assert autotune.TUNED == {("k", 1): "b"}


def test_skips_candidates_that_do_not_fit(gpu_tuner):
    times, ran = gpu_tuner
    times.update(b=5.0)

    def run(cand):
        ran.append(cand)
        if cand == "a":
            raise OutOfResources(300000, 232448, "shared memory")

    assert autotune.pick("k", run, lambda: ["a", "b"]) == "b"
    with pytest.raises(RuntimeError, match="no kernel variant compiles"):
        autotune.pick("k2", run, lambda: ["a"])


def test_capture_takes_the_first_candidate_untimed_and_uncached(gpu_tuner, monkeypatch):
    _, ran = gpu_tuner
    monkeypatch.setattr(autotune, "capturing", lambda: True)
    assert autotune.pick("k", ran.append, lambda: ["a", "b"]) == "a"
    assert not ran and not autotune.TUNED
    assert not autotune.will_time("k")


def test_interpreter_runs_the_fixed_variant():
    # The test session runs under the interpreter (conftest.py).
    assert autotune.pick("k", None, None) is autotune.INTERPRETER_CONFIG
    assert autotune.pick("k", None, None, fixed="mine") == "mine"
    assert not autotune.will_time("k")


def test_library_gemm_is_a_variant_of_its_own():
    cands = autotune.tiles_and_library(1, torch.float16)
    assert cands[-1] is autotune.LIBRARY_GEMM and not isinstance(cands[-1], autotune.KernelConfig)
    assert all(isinstance(c, autotune.KernelConfig) for c in cands[:-1])


def test_fp32_tiles_halve_block_k():
    half = autotune.gemm_candidates(4096)
    full = autotune.gemm_candidates(4096, torch.float32)
    assert [c.block_k for c in full] == [max(16, c.block_k // 2) for c in half]
    assert autotune.m_bucket(0) == 1 and autotune.m_bucket(33) == 64 and autotune.m_bucket(64) == 64
