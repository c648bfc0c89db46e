"""The compiler report (benchmarks/compiler_report.py): every tuner candidate of every
kernel, compiled for Hopper (sm_90) in bf16 and fp16, neither spills registers nor needs
more shared memory than a CTA may have. No GPU needed (see tests/sm90.py).

The fixture compiles the whole catalogue (what the other sm_90 tests check as well),
so those find their reports in the on-disk cache. The table is attached to the test's
report (``pytest -rA`` prints it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import ON_GPU
from sm90 import (
    HOPPER_MAX_SHARED, ctas_per_sm, loop_wgmma_pendings, parse_ptxas, pytest_progress, report_sm90, wgmma_pendings,
)
from sm90_specs import catalogue

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compiler_report  # noqa: E402

pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")

CATALOGUE = catalogue()
TUNED = [s for s in CATALOGUE if s.get("tuned")]


@pytest.fixture(scope="module")
def table(pytestconfig) -> List[Dict[str, Any]]:
    reports = report_sm90(CATALOGUE, progress=pytest_progress(pytestconfig))
    return compiler_report.rows(TUNED, reports)


def test_every_tuned_candidate_of_every_kernel_is_reported_in_bf16_and_fp16():
    kernels = {"lora", "lora_tma", "splitk_reduce", "ia3", "bottleneck", "mlora_shrink", "mlora_expand"}
    for dtype in ("bf16", "fp16"):
        assert {s["kernel_name"] for s in TUNED if s["dtype"] == dtype} == kernels
    from sm90_specs import lora_configs

    # each LoRA candidate (split-K, precomputed xa, TMA included) has a row per dtype
    for cfg in lora_configs():
        labels = {(s["dtype"], s["kernel_name"]) for s in TUNED if s["config"].startswith(
            f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}")}
        assert {("bf16", "lora_tma" if cfg.tma else "lora"), ("fp16", "lora_tma" if cfg.tma else "lora")} <= labels


def test_no_tuned_candidate_spills_or_overflows_shared_memory(table, request):
    request.node.add_report_section("call", "sm_90 compiler report", compiler_report.summary(table))
    bad = compiler_report.problems(table)
    assert not bad["errors"], [r["error"] for r in table if "error" in r][:3]
    spills = [f"{r['id']}: {r['regs']} regs, {r['spill']} B spilled" for r in table if r["id"] in bad["spills"]]
    assert not spills, "spilling candidates:\n" + "\n".join(spills)
    assert not bad["over_smem"], bad["over_smem"]
    assert all(r["shared"] <= HOPPER_MAX_SHARED and r["ctas_per_sm"] >= 1 for r in table)


def test_large_lora_tiles_keep_mmas_in_flight(table):
    """The bf16/fp16 LoRA main loops with 128-row tiles run on wgmma and leave a group in
    flight at each K step (the loop does not wait for every MMA)."""
    big = [r for r in table if r["kernel"] in ("lora", "lora_tma") and r["config"].startswith("128x")
           and r["variant"].startswith(("loop", "base"))]
    assert big
    for r in big:
        assert r["wgmma"] and r["wgmma_max_pendings"] >= 1, r


def test_ptxas_and_occupancy_parsing():
    log = ("ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
           "    536 bytes stack frame, 1564 bytes spill stores, 1560 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 536 bytes cumulative stack size\n")
    assert parse_ptxas(log) == {"regs": 255, "stack": 536, "spill_stores": 1564, "spill_loads": 1560,
                                "wgmma_serialized": True}
    with pytest.raises(ValueError):
        parse_ptxas("ptxas fatal")
    # 128 regs x 256 threads = half the register file: 2 CTAs; 168 regs: 1.
    assert ctas_per_sm(128, 1024, 8) == {"ctas_per_sm": 2, "limited_by": "regs"}
    assert ctas_per_sm(168, 1024, 8)["ctas_per_sm"] == 1
    assert ctas_per_sm(32, 100 * 1024, 4) == {"ctas_per_sm": 2, "limited_by": "smem"}
    assert ctas_per_sm(32, 0, 4)["ctas_per_sm"] == 16  # 64 warps / 4
    assert ctas_per_sm(32, HOPPER_MAX_SHARED + 1, 4)["ctas_per_sm"] == 0
    ttgir = ("  %a = ttng.warp_group_dot %x\n"
             "  %1 = scf.for %k = %c0 to %K step %c64 {\n"
             "    %d = ttng.warp_group_dot %x, %w, %acc\n"
             "    %e = ttng.warp_group_dot_wait %d {pendings = 1 : i32}\n"
             "  }\n"
             "  %f = ttng.warp_group_dot_wait %1 {pendings = 0 : i32}\n")
    assert wgmma_pendings(ttgir) == [1, 0]
    assert loop_wgmma_pendings(ttgir) == [1]
    assert loop_wgmma_pendings(ttgir.replace("warp_group_dot %x, %w", "dot %x, %w")) == []


def test_reports_are_cached_by_compile_relevant_content(tmp_path, monkeypatch):
    """A second report of the same specs compiles nothing; ids and labels are not part of
    the key, constexprs are."""
    import sm90

    monkeypatch.setenv("FASTPEFT_SM90_CACHE", str(tmp_path))
    monkeypatch.setenv("FASTPEFT_SM90_STORE", "off")
    compiled = []

    def fake_compile(items, root, timeout, progress, workers, total):
        compiled.append([spec["id"] for _, spec in items])
        for key, _ in items:
            sm90._write_cached(root / key[:2] / f"{key}.json", {"shared": 1})
        return {key: {"shared": 1} for key, _ in items}

    monkeypatch.setattr(sm90, "_compile_missing", fake_compile)
    spec = next(s for s in CATALOGUE if s["id"] == "splitk-reduce")
    renamed = {**spec, "id": "same-compile", "variant": "other label"}
    both = report_sm90([spec, renamed], progress=None)
    assert both == {"splitk-reduce": {"shared": 1}, "same-compile": {"shared": 1}}
    assert len(compiled) == 1 and len(compiled[0]) == 1  # one compile for both names
    lines = []
    assert report_sm90([renamed], progress=lines.append)["same-compile"] == {"shared": 1}
    assert len(compiled) == 1 and "found" in lines[0]
    wider = {**spec, "id": "wider", "constexprs": {**spec["constexprs"], "BLOCK_N": 256}}
    report_sm90([wider], progress=None)
    assert compiled[-1] == ["wider"]


def test_committed_store_serves_unchanged_kernels_only(tmp_path, monkeypatch):
    """A fresh clone (empty disk cache) takes reports from the committed store; a kernel
    whose sources changed misses it and is compiled; ``update`` writes what it served."""
    import sm90

    monkeypatch.setattr(sm90, "STORE", tmp_path / "store.json")
    compiled = []

    def fake_compile(items, root, timeout, progress, workers, total):
        compiled.append([spec["id"] for _, spec in items])
        return {key: {"shared": 2} for key, _ in items}

    monkeypatch.setattr(sm90, "_compile_missing", fake_compile)
    spec = next(s for s in CATALOGUE if s["id"] == "splitk-reduce")
    monkeypatch.setenv("FASTPEFT_SM90_CACHE", str(tmp_path / "cache-a"))
    monkeypatch.setenv("FASTPEFT_SM90_STORE", "update")
    assert report_sm90([spec], progress=None) == {"splitk-reduce": {"shared": 2}}
    assert len(compiled) == 1 and len(json.loads(sm90.STORE.read_text())) == 1
    monkeypatch.setenv("FASTPEFT_SM90_CACHE", str(tmp_path / "cache-b"))  # a fresh clone
    monkeypatch.setenv("FASTPEFT_SM90_STORE", "read")
    assert report_sm90([spec], progress=None) == {"splitk-reduce": {"shared": 2}}
    assert len(compiled) == 1  # served by the store
    monkeypatch.setattr(sm90, "_source_digest", lambda module: "edited kernel sources")
    report_sm90([spec], progress=None)
    assert compiled[-1] == ["splitk-reduce"] and len(compiled) == 2
    monkeypatch.setenv("FASTPEFT_SM90_STORE", "sometimes")
    with pytest.raises(ValueError, match="FASTPEFT_SM90_STORE"):
        report_sm90([spec], progress=None)


def test_launchers_offer_what_the_report_checks():
    """The mixed-adapter expand gathers on tiles of at most 32 rows and leaves out the
    split-base tiles that spill at 4 K splits; the TMA launch runs a rank-64 in-loop
    shrink on the widest tile with the stages that fit."""
    from fastpeft.kernels.autotune import KernelConfig
    from fastpeft.kernels.lora_tma import tma_stages
    from fastpeft.kernels.multi_lora_meta import expand_candidates

    for m in (1, 16, 64, 4096):
        assert all(c.block_m <= 32 for c in expand_candidates(m, None, True, True, 8))
    kept = {(c.block_m, c.block_n) for c in expand_candidates(256, None, False, False, 4)}
    assert (32, 128) not in kept and (32, 64) in kept
    assert (32, 128) in {(c.block_m, c.block_n) for c in expand_candidates(256, None, True, False, 4)}
    w4 = {(c.block_m, c.block_n, c.num_warps) for c in expand_candidates(4096, None, False, False, 1)}
    assert (128, 128, 4) not in w4 and (128, 128, 8) in w4
    wide = KernelConfig(128, 256, 64, 8, 8, 3, tma=True)
    assert tma_stages(wide, 64, True, 2, 2) == 2 and tma_stages(wide, 16, True, 2, 2) == 3
    assert tma_stages(wide, 64, False, 2, 2) == 3
