"""DoRA's GPU code compiles for Hopper (sm_90) and fits its shared memory: the fused LoRA
kernel with the column-scale epilogue (largest tile, in-loop and precomputed ``xa``, a
split-K decode tile, the persistent TMA kernel), the mixed kernel's per-row scale and the row-norm kernel. No GPU
needed (see tests/sm90.py); a few representative configs, not every candidate."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, report_sm90

from fastpeft.kernels import autotune
from fastpeft.kernels import dora as dora_kernels

pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")

BIG = max(autotune.gemm_candidates(4096), key=lambda c: c.block_m * c.block_n)
DECODE = next(c for c in autotune.lora_candidates(1, 16384, True) if c.split_k > 1)
TMA = next(c for c in autotune.lora_candidates(4096, 4096, True, tma_ok=True) if c.tma)
I32 = "i32"


def _lora(cfg, block_r: int, in_loop: bool) -> Dict[str, Any]:
    ptrs = {p: "bf16" for p in ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "xa_ptr", "y_ptr")}
    ptrs["mag_ptr"] = "fp32"
    if cfg.split_k > 1:
        ptrs["y_ptr"] = "fp32"
    return {
        "id": f"lora-mag-{cfg.block_m}x{cfg.block_n}k{cfg.split_k}-r{block_r}-{in_loop}",
        "module": "fastpeft.kernels.lora",
        "kernel": "_lora_linear_fwd_kernel",
        "ptr_dtypes": ptrs,
        "constexprs": dict(
            HAS_BIAS=True, HAS_LORA=True, HAS_MAG=True, SHRINK_IN_LOOP=in_loop, SPLIT_K=cfg.split_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            LORA_FP32=False, INPUT_PRECISION="ieee",
        ),
        "unit_args": ["stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _tma(cfg, block_r: int) -> Dict[str, Any]:
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    return {
        "id": f"tma-mag-{bm}x{bn}-r{block_r}",
        "module": "fastpeft.kernels.lora_tma",
        "kernel": "_lora_linear_tma_kernel",
        "descriptors": {
            "x_desc": f"tensordesc<bf16[{bm}, {bk}]>", "w_desc": f"tensordesc<bf16[{bn}, {bk}]>",
            "a_desc": f"tensordesc<bf16[{block_r}, {bk}]>", "y_desc": f"tensordesc<bf16[{bm}, {bn}]>",
        },
        "ptr_dtypes": {"bias_ptr": "bf16", "b_ptr": "bf16", "xa_ptr": "bf16", "mag_ptr": "fp32"},
        "constexprs": dict(
            HAS_BIAS=True, HAS_LORA=True, HAS_MAG=True, SHRINK_IN_LOOP=True, SPLIT_K=1, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk,
            BLOCK_R=block_r, GROUP_M=cfg.group_m, LORA_FP32=False, INPUT_PRECISION="ieee",
        ),
        "unit_args": ["stride_br", "stride_xar"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _expand(cfg, fuse: bool, gather: bool) -> Dict[str, Any]:
    return {
        "id": f"expand-mag-{cfg.block_m}x{cfg.block_n}-{fuse}-{gather}",
        "module": "fastpeft.kernels.multi_lora",
        "kernel": "_mlora_expand_kernel",
        "ptr_dtypes": {
            "x_ptr": "bf16", "w_ptr": "bf16", "bias_ptr": "bf16", "b_ptr": "bf16", "xa_ptr": "fp32", "mag_ptr": "fp32",
            "y_ptr": "bf16", "sorted_rows_ptr": I32, "sorted_slot_ptr": I32, "seg_end_ptr": I32, "rank_ptr": I32,
            "scaling_ptr": "fp32",
        },
        "constexprs": dict(
            FUSE_BASE=fuse, HAS_BIAS=True, HAS_MAG=True, GATHER=gather, SPLIT_K=1, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=16, GROUP_M=cfg.group_m, LORA_FP32=False,
            INPUT_PRECISION="ieee",
        ),
        "unit_args": ["stride_xk", "stride_wk", "stride_br", "stride_xar", "stride_yn"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _norm(dtype: str, block_r: int) -> Dict[str, Any]:
    block_n, block_k, _ = dora_kernels._GPU_TILES
    return {
        "id": f"row-norm-{dtype}-r{block_r}",
        "module": "fastpeft.kernels.dora",
        "kernel": "_dora_row_norm_kernel",
        "ptr_dtypes": {"w_ptr": dtype, "a_ptr": "fp32", "b_ptr": "fp32", "norm_ptr": "fp32"},
        "constexprs": dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r),
        "unit_args": ["stride_wk", "stride_ak", "stride_br"],
        "float_args": ["scaling"],
        "num_warps": 4,
        "num_stages": 3,
    }


SPECS: List[Dict[str, Any]] = [
    _lora(BIG, 16, True), _lora(BIG, 32, False), _lora(DECODE, 16, True), _tma(TMA, 16),
    _expand(autotune.gemm_candidates(1)[0], True, True), _expand(BIG, False, False),
    _norm("bf16", 32), _norm("fp32", 16),
]


@pytest.fixture(scope="module")
def reports() -> Dict[str, Dict[str, Any]]:
    return report_sm90(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["id"])
def test_dora_kernels_compile_for_hopper(reports, spec):
    rep = reports[spec["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec['id']} needs {rep['shared']} B of shared memory"
    if spec["kernel"] in ("_lora_linear_fwd_kernel", "_lora_linear_tma_kernel"):
        assert rep["pipelined"], f"{spec['id']}: the K loop's loads are not pipelined"
