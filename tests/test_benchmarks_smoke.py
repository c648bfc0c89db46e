"""The benchmark programs, the self-check and the GPU-check script run and check results.

Timing itself is never tested (benchmarks are programs); these tests make sure the
programs work on a CPU machine and that their GPU code paths build every variant and
check it against the reference before timing.
"""
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


def _run(args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def stub_timers(monkeypatch):
    """The GPU timers replaced: each variant runs once and 'takes' 1 ms; no CUDA graphs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "bench_ms", lambda fn, **kw: (fn(), 1.0)[1])

    def no_graphs(fn, **kw):
        raise RuntimeError("no CUDA graphs here")

    monkeypatch.setattr(common, "bench_graph_ms", no_graphs)
    return common


@pytest.fixture
def bench_lora(stub_timers):
    return importlib.import_module("bench_lora")


def test_bench_lora_cpu_pass_writes_json(tmp_path):
    out = tmp_path / "lora.json"
    proc = _run([str(BENCH / "bench_lora.py"), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-correctness"
    assert data["results"] and all(r["rel_err"] <= r["tol"] for r in data["results"])
    assert all(r["floor_err"] <= r["tol"] for r in data["results"])  # the library-GEMM floor


def test_bench_lora_point_checks_every_variant(bench_lora):
    row = bench_lora._time_point(40, 24, 5, 4, dev="cpu", dt=torch.float32, with_compile=False)
    for name in ("unfused", "peft", "fastpeft", "floor"):
        assert row[f"{name}_err"] < 1e-5, row
        assert row[f"{name}_x"] == 1.0
    assert "fastpeft_graph_error" in row  # recorded, not raised
    # the tuner's pick is named (under the interpreter: its fixed config)
    from fastpeft.kernels.autotune import INTERPRETER_CONFIG, LIBRARY_GEMM

    assert row["fastpeft_pick"] == bench_lora.describe(INTERPRETER_CONFIG) != bench_lora.describe(LIBRARY_GEMM)


def test_bench_lora_refuses_to_time_a_wrong_result(bench_lora, monkeypatch):
    import common

    with pytest.raises(AssertionError, match="refusing to time"):
        common.check_close("bad", torch.ones(3), torch.zeros(3) + 2, 1e-3)
    monkeypatch.setattr(bench_lora, "lora_linear", lambda *a, **k: torch.zeros(5, 24))
    row = bench_lora._time_point(40, 24, 5, 4, dev="cpu", dt=torch.float32, with_compile=False)
    assert "fastpeft_error" in row and "fastpeft_ms" not in row


def test_selfcheck_passes_here(capsys):
    from fastpeft import selfcheck

    assert selfcheck.main(["--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "checks passed" in out and "FAIL" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit of the GPU script")
def test_gpu_check_script_says_no_gpu():
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr


def test_bench_multi_point_checks_every_variant(stub_timers):
    bench_multi = importlib.import_module("bench_multi")
    row = bench_multi._time_point(9, 4, "mixed", "zipf", dev="cpu", dt=torch.float32, k=40, nn_=24)
    checked = [k[: -len("_err")] for k in row if k.endswith("_err")]
    assert "fastpeft" in checked and "peft_loop" in checked and "gather_bmm" in checked, row
    assert all(row[f"{name}_err"] < 1e-5 for name in checked), row
    assert not [k for k in row if k.endswith("_error") and "graph" not in k], row


def test_bench_lora_training_point_checks_every_variant(bench_lora):
    row = bench_lora._time_train_point(40, 24, 9, 4, dev="cpu", dt=torch.float32)
    assert row["pass"] == "fwd+bwd"
    for name in ("unfused", "peft", "fastpeft"):
        assert row[f"{name}_err"] < 1e-5, row
        assert row[f"{name}_x"] == 1.0


def test_bench_train_cpu_pass_writes_json(tmp_path):
    out = tmp_path / "train.json"
    proc = _run([str(BENCH / "bench_train.py"), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-correctness" and data["results"]
    for row in data["results"]:
        assert row["fastpeft_dropout_err"] <= 1e-2 and row["fastpeft_saved_bytes"] < row["peft_saved_bytes"], row


def test_bench_train_point_checks_and_times_every_variant(stub_timers):
    bench_train = importlib.import_module("bench_train")
    pt = bench_train.Point(24, 16, 5, 2, 0.2, torch.float32, torch.float32, "cpu")
    row = bench_train.point_row(pt, {}, 1e-5, with_compile=False, time_it=True)
    assert not [k for k in row if k.endswith("_error")], row
    for name in ("unfused", "peft", "fastpeft"):
        assert row[f"{name}_err"] < 1e-5 and row[f"{name}_x"] == 1.0, row


def test_bench_decode_cpu_pass_static_equals_eager(stub_timers):
    """The decode benchmark's CPU pass runs the static-buffer decode and checks it against eager."""
    bench_decode = importlib.import_module("bench_decode")
    rows = bench_decode.run_cpu()
    assert [r["batch"] for r in rows] == [1, 3] and all(r["same_tokens"] == 1.0 for r in rows)


def test_host_overhead_counts_launches_and_allocations(tmp_path):
    out = tmp_path / "host.json"
    proc = _run([str(BENCH / "host_overhead.py"), "--iters", "3", "--repeats", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = {(r["case"], r["M"], r["grad"]): r for r in json.loads(out.read_text())["results"]}
    assert all(isinstance(r[k], int) for r in rows.values() for k in ("launches", "allocs", "aten_ops"))
    assert rows[("nn.Linear", 1, False)]["launches"] == 0 and rows[("nn.Linear", 1, False)]["allocs"] >= 1
    for m in (1, 16, 4096):
        for grad in (False, True):
            lora = rows[("FastLoRALinear", m, grad)]
            # Inference: one fused launch. Training: the shrink kernel (it keeps S = x A^T for
            # the backward) and the GEMM that adds s S B^T in its epilogue.
            assert lora["launches"] == (2 if grad else 1) and lora["allocs"] >= 1, (m, grad)
    for case in ("IA3Linear", "BottleneckLinear", "mixed, own adapters", "mixed, AdapterPool"):
        assert any(k[0] == case and r["launches"] >= 1 for k, r in rows.items()), case
    assert all(r["x_linear"] > 0 for r in rows.values())


def test_bench_dora_point_checks_every_variant(stub_timers):
    """bench_dora's GPU path builds every variant (PEFT's DoRA layer, cached and not, the
    fused layer, a mixed batch, training steps) and checks each before timing."""
    pytest.importorskip("peft")
    row = importlib.import_module("bench_dora")._time_point(48, 40, 6, dev="cpu", dt=torch.float32)
    for name in ("fused", "fused_nocache", "mixed", "peft", "peft_cached", "train_fused", "train_peft"):
        assert f"{name}_error" not in row, row.get(f"{name}_error")
        assert row[f"{name}_err"] <= 1e-4, name
        assert row[f"{name}_x"] == 1.0
