"""The benchmarks' GPU sweeps, with each point stubbed out: every point of the sweep is
measured once, in order, under a progress bar, and the JSON holds every row."""
from __future__ import annotations

import importlib
import itertools
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("common")
    bars = []
    real = common.progress
    monkeypatch.setattr(common, "progress", lambda points, desc: bars.append((desc, len(points))) or real(points, desc))
    return common, bars


def _stub(calls, kind):
    def point(*args, **kwargs):
        calls.append((kind, args))
        return {"pass": kind, "K": 1, "N": 1, "M": 1, "r": 16}
    return point


def _expected(name, module):
    """The points each sweep must visit in --quick mode, from the module's own lists."""
    if name == "bench_lora":
        fwd = [("fwd", (K, N, M, 16)) for (K, N) in module.QUICK_SHAPES for M in module.QUICK_MS]
        return fwd + [("train", (*module.QUICK_SHAPES[0], 4096, 16))]
    if name == "bench_adapters":
        return [("fwd", (K, N, M)) for (K, N) in module.SHAPES for M in module.QUICK_MS]
    if name == "bench_adalora":
        points = itertools.product(module.QUICK_SHAPES, module.QUICK_MS, ("fwd", "train"))
        return [(kind, (K, N, M)) for (K, N), M, kind in points]
    return None  # bench_multi: its quick points are a list inside run_gpu


@pytest.mark.parametrize("name", ["bench_lora", "bench_adapters", "bench_multi", "bench_adalora"])
def test_quick_sweep_visits_every_point_once_with_progress(bench, monkeypatch, tmp_path, name):
    common, bars = bench
    module = importlib.import_module(name)
    calls = []
    monkeypatch.setattr(module, "_time_point", _stub(calls, "fwd"))
    if hasattr(module, "_time_train_point"):
        monkeypatch.setattr(module, "_time_train_point", _stub(calls, "train"))
    out = tmp_path / "partial.json"
    rows = module.run_gpu(True, str(out), {"device": "stub"})
    expected = _expected(name, module)
    if expected is not None:
        assert calls == expected
    assert len(rows) == len(calls) > 1
    per_point = 2 if name == "bench_adalora" else 1  # AdaLoRA: forward and training pass per point
    assert sum(n for _, n in bars) * per_point == len(calls)
    assert len(json.loads(out.read_text())["results"]) == len(rows)
