"""benchmarks/bench_adapters.py runs on a CPU machine, and its GPU code path builds and
checks every variant (timers stubbed: timing itself is never tested)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_cpu_correctness_pass(tmp_path):
    out = tmp_path / "bench_adapters.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_adapters.py"), "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA GPU" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["mode"] == "cpu-correctness"
    assert {r["op"] for r in payload["results"]} == {"ia3_out", "ia3_in", "bottleneck"}
    assert all(r["rel_err"] <= r["tol"] for r in payload["results"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in of the GPU path")
def test_gpu_code_path_builds_and_checks_every_variant(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    bench = importlib.import_module("bench_adapters")
    monkeypatch.setattr(common, "bench_ms", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(bench, "GRAPH_MAX_M", 0)  # CUDA graphs need CUDA
    monkeypatch.setattr(bench, "BOTTLENECK", 8)
    row = bench._time_point(48, 40, 20, dev="cpu", dt=torch.float32)
    errors = {k: v for k, v in row.items() if k.endswith("_error")}
    assert not errors, errors
    for name in ("ia3_out_unfused", "ia3_out_peft", "ia3_out_fused", "ia3_in_unfused", "ia3_in_peft",
                 "ia3_in_fused", "bn_unfused", "bn_fused", "bn_fused_nocache"):
        assert row[f"{name}_x"] == 1.0, name
        assert row[f"{name}_err"] <= 1e-5, name
    assert row["target"].startswith("ia3_out")
