"""Every GPU launch config of the fused LoRA kernel compiles for Hopper (sm_90), fits in
its shared memory, is software-pipelined and uses wgmma where the tile allows it.

No GPU needed: triton compiles ahead of time with its bundled ptxas (see tests/sm90.py).
"""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, report_sm90

from fastpeft.kernels import autotune

UNIT_STRIDES = ["stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn"]
PTRS = ["x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "xa_ptr", "y_ptr"]
CANDIDATES = sorted(
    {cfg for m in (1, 64, 4096) for cfg in autotune.gemm_candidates(m)},
    key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages),
)
SPLIT_K = sorted(
    {cfg for cfg in autotune.lora_candidates(1, 16384, True) if cfg.split_k > 1},
    key=lambda c: (c.block_n, c.split_k),
)
# What the tuner times for fp32 inputs (tiles sized for 4-byte elements), split-K included.
FP32_CANDIDATES = sorted(
    {cfg for m in (1, 64, 4096) for cfg in autotune.lora_candidates(m, 16384, True, dtype=torch.float32)
     if not cfg.tma and not cfg.precompute_xa},
    key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.split_k),
)
# (padded rank, in-loop shrink): r <= 16, r <= 64, no adapter (base GEMM), epilogue path.
LORA_VARIANTS = [(16, True), (64, True), (0, True), (32, False)]
FP32_ADAPTER_VARIANTS = [(16, True), (32, False)]
PRECISION = {"bf16": "ieee", "fp16": "ieee", "fp32": "ieee"}


def _cfg_id(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"


def _spec(
    cfg, dtype: str, block_r: int, in_loop: bool, adapter_dtype: str = "", precision: str = ""
) -> Dict[str, Any]:
    ptrs = {p: dtype for p in PTRS}
    # Adapters kept in another dtype than a 16-bit x (fp32 adapters on a bf16/fp16 base):
    # the LoRA branch keeps fp32 range (tf32 dots, fp32 xa).
    lora_fp32 = bool(adapter_dtype) and adapter_dtype != dtype and dtype != "fp32"
    if adapter_dtype:
        ptrs.update(a_ptr=adapter_dtype, b_ptr=adapter_dtype)
    if lora_fp32:
        ptrs["xa_ptr"] = "fp32"
    if cfg.split_k > 1:  # split-K programs write fp32 partial sums
        ptrs["y_ptr"] = "fp32"
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    return {
        "id": f"{dtype}{tag}-{_cfg_id(cfg)}-k{cfg.split_k}-r{block_r}-{'loop' if in_loop else 'epi'}{precision}",
        "module": "fastpeft.kernels.lora",
        "kernel": "_lora_linear_fwd_kernel",
        "ptr_dtypes": ptrs,
        "constexprs": dict(
            HAS_BIAS=True,
            HAS_LORA=block_r > 0,
            SHRINK_IN_LOOP=in_loop,
            SPLIT_K=cfg.split_k,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_R=max(block_r, 16),
            GROUP_M=cfg.group_m,
            LORA_FP32=lora_fp32,
            INPUT_PRECISION=precision or PRECISION[dtype],
        ),
        "unit_args": UNIT_STRIDES,
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


TMA = sorted(
    {c for c in autotune.lora_candidates(4096, 4096, True, tma_ok=True) if c.tma and not c.precompute_xa},
    key=_cfg_id,
)
# (padded rank, precomputed xa): in-loop shrink at r <= 16 / r <= 64, epilogue, base only.
TMA_VARIANTS = [(16, False), (64, False), (32, True), (0, False)]


FP32_TMA = sorted(
    {c for c in autotune.lora_candidates(4096, 4096, True, tma_ok=True, dtype=torch.float32)
     if c.tma and not c.precompute_xa},
    key=_cfg_id,
)


def _tma_spec(
    cfg, block_r: int, pre: bool, dtype: str = "bf16", precision: str = "ieee", adapter_dtype: str = ""
) -> Dict[str, Any]:
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    dt = dtype
    at = adapter_dtype or dtype
    lora_fp32 = at != dtype and dtype != "fp32"
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    tag += f"-k{cfg.split_k}" if cfg.split_k > 1 else ""
    # Split-K units store fp32 partial sums into a (splits, M, N) buffer.
    y_desc = f"tensordesc<fp32[1, {bm}, {bn}]>" if cfg.split_k > 1 else f"tensordesc<{dt}[{bm}, {bn}]>"
    return {
        "id": f"tma-{dtype}{tag}-{_cfg_id(cfg)}-r{block_r}-{'pre' if pre else 'loop'}{precision}",
        "module": "fastpeft.kernels.lora_tma",
        "kernel": "_lora_linear_tma_kernel",
        "descriptors": {
            "x_desc": f"tensordesc<{dt}[{bm}, {bk}]>",
            "w_desc": f"tensordesc<{dt}[{bn}, {bk}]>",
            "a_desc": f"tensordesc<{at}[{max(block_r, 16)}, {bk}]>" if not pre else f"tensordesc<{dt}[{bn}, {bk}]>",
            "y_desc": y_desc,
        },
        "ptr_dtypes": {"bias_ptr": dt, "b_ptr": at, "xa_ptr": "fp32" if lora_fp32 else dt},
        "constexprs": dict(
            HAS_BIAS=True,
            HAS_LORA=block_r > 0,
            SHRINK_IN_LOOP=block_r > 0 and not pre,
            SPLIT_K=cfg.split_k,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            BLOCK_R=max(block_r, 16),
            GROUP_M=cfg.group_m,
            LORA_FP32=lora_fp32,
            INPUT_PRECISION=precision,
        ),
        "unit_args": ["stride_br", "stride_xar"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


# Split-K where an M >= 128 grid leaves SMs idle (Llama-3-8B's 4096x4096 at M = 128 on
# 132 SMs): one split factor per tile, the persistent TMA tiles and the plain ones.
_SPLIT_AT_128 = autotune.lora_candidates(128, 4096, True, tma_ok=True, n=4096, programs=132)
TMA_SPLIT_K = sorted({c for c in _SPLIT_AT_128 if c.tma and c.split_k == 2}, key=_cfg_id)
TILE_SPLIT_K = sorted({c for c in _SPLIT_AT_128 if not c.tma and c.split_k == 2 and c.block_m >= 64}, key=_cfg_id)


# The input gradient runs the forward kernel on transposed views (W^T, B^T, A^T): other
# strides are the unit ones.
BACKWARD_UNIT_STRIDES = ["stride_xk", "stride_wn", "stride_ar", "stride_bn", "stride_yn"]


def _backward_spec(cfg, dtype: str = "bf16", precision: str = "", adapter_dtype: str = "") -> Dict[str, Any]:
    spec = _spec(cfg, dtype, 16, True, adapter_dtype=adapter_dtype, precision=precision)
    spec["id"] = "backward-" + spec["id"]
    spec["unit_args"] = BACKWARD_UNIT_STRIDES
    return spec


def _all_specs() -> List[Dict[str, Any]]:
    specs = [_spec(c, "bf16", r, loop) for c in CANDIDATES for r, loop in LORA_VARIANTS]
    specs += [_spec(c, "fp16", 64, True) for c in CANDIDATES]
    specs += [_spec(c, "fp32", r, loop, precision=p) for c in FP32_CANDIDATES for p in ("ieee", "tf32")
              for r, loop in ((64, True), (32, False))]
    specs += [_backward_spec(c, "fp32", p) for c in FP32_CANDIDATES for p in ("ieee", "tf32")]
    specs += [_tma_spec(c, r, pre, "fp32", "tf32") for c in FP32_TMA for r, pre in TMA_VARIANTS]
    specs += [_spec(c, "bf16", r, loop) for c in SPLIT_K for r, loop in ((16, True), (32, False))]
    specs += [_tma_spec(c, r, pre) for c in TMA for r, pre in TMA_VARIANTS]
    specs += [_spec(c, dt, r, loop, adapter_dtype="fp32") for c in CANDIDATES for dt in ("bf16", "fp16")
              for r, loop in FP32_ADAPTER_VARIANTS]
    specs += [_tma_spec(c, r, pre, "fp16", adapter_dtype="fp32") for c in TMA for r, pre in TMA_VARIANTS]
    specs += [_backward_spec(c) for c in CANDIDATES]
    specs += [_backward_spec(c, "fp16", adapter_dtype="fp32") for c in CANDIDATES]
    specs += [_tma_spec(c, r, pre) for c in TMA_SPLIT_K for r, pre in ((16, False), (32, True))]
    specs += [_spec(c, "bf16", 16, True) for c in TILE_SPLIT_K]
    specs.append(
        {
            "id": "splitk-reduce",
            "module": "fastpeft.kernels.lora",
            "kernel": "_splitk_reduce_kernel",
            "ptr_dtypes": {"p_ptr": "fp32", "bias_ptr": "bf16", "y_ptr": "bf16"},
            "constexprs": dict(HAS_BIAS=True, SPLIT_K=4, BLOCK_M=16, BLOCK_N=128),
            "unit_args": ["stride_pn", "stride_yn"],
        }
    )
    return specs


# On a GPU the CUDA tests compile and run the same kernels for real.
pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")


@pytest.fixture(scope="module")
def reports() -> Dict[str, Dict[str, Any]]:
    return report_sm90(_all_specs())


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
@pytest.mark.parametrize("block_r,in_loop", LORA_VARIANTS, ids=lambda v: str(v))
def test_bf16_lora_kernel_compiles_for_hopper(reports, cfg, block_r, in_loop):
    rep = reports[_spec(cfg, "bf16", block_r, in_loop)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"
    assert rep["pipelined"], f"{cfg}: the K loop's loads are not pipelined"
    if cfg.block_m >= 64:
        assert rep["wgmma"], f"{cfg}: no wgmma for a {cfg.block_m}-row tile"


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
def test_fp16_lora_kernel_fits_hopper(reports, cfg):
    rep = reports[_spec(cfg, "fp16", 64, True)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"], rep


@pytest.mark.parametrize("cfg", FP32_CANDIDATES, ids=lambda c: f"{_cfg_id(c)}k{c.split_k}")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_tiles_fit_hopper(reports, cfg, precision):
    """fp32 inputs get tiles sized for 4-byte elements: every one the tuner times fits,
    with tf32 on (HF Trainer's tf32=True) or off, forward and input-gradient layouts."""
    specs = [_spec(cfg, "fp32", r, loop, precision=precision) for r, loop in ((64, True), (32, False))]
    specs.append(_backward_spec(cfg, "fp32", precision))
    for spec in specs:
        rep = reports[spec["id"]]
        assert "error" not in rep, rep.get("error")
        assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec['id']} needs {rep['shared']} B of shared memory"
        assert rep["pipelined"], spec["id"]


@pytest.mark.parametrize("block_r,pre", TMA_VARIANTS, ids=lambda v: str(v))
def test_fp32_tma_variants_have_a_fitting_tile(reports, block_r, pre):
    """The widest fp32 TMA tiles stage a y tile too large for shared memory (the tuner
    skips them); each variant keeps at least one that fits."""
    fitting = []
    for cfg in FP32_TMA:
        rep = reports[_tma_spec(cfg, block_r, pre, "fp32", "tf32")["id"]]
        assert "error" not in rep, rep.get("error")
        if rep["shared"] <= HOPPER_MAX_SHARED:
            assert rep["pipelined"] and rep["wgmma"], rep
            fitting.append(cfg)
    assert fitting, f"no fp32 TMA tile fits for r={block_r} pre={pre}"


@pytest.mark.parametrize("cfg", SPLIT_K, ids=lambda c: f"{_cfg_id(c)}k{c.split_k}")
@pytest.mark.parametrize("block_r,in_loop", [(16, True), (32, False)], ids=lambda v: str(v))
def test_split_k_variants_compile_for_hopper(reports, cfg, block_r, in_loop):
    rep = reports[_spec(cfg, "bf16", block_r, in_loop)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"]


def test_split_k_reduce_compiles_for_hopper(reports):
    assert "error" not in reports["splitk-reduce"], reports["splitk-reduce"].get("error")


@pytest.mark.parametrize("cfg", TMA, ids=_cfg_id)
@pytest.mark.parametrize("block_r,pre", TMA_VARIANTS, ids=lambda v: str(v))
def test_tma_kernel_compiles_for_hopper(reports, cfg, block_r, pre):
    rep = reports[_tma_spec(cfg, block_r, pre)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["pipelined"] and rep["wgmma"], rep
    # A rank-64 shrink on the widest tile may not fit: the tuner skips a config whose
    # launch runs out of shared memory. Everything else must fit.
    if block_r <= 16 or pre or cfg.block_n <= 128:
        assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("block_r,in_loop", FP32_ADAPTER_VARIANTS, ids=lambda v: str(v))
def test_fp32_adapters_on_a_half_base_fit_hopper(reports, cfg, dtype, block_r, in_loop):
    """fp32 adapters on a 16-bit base keep the LoRA branch in fp32 (tf32 dots): the
    in-loop shrink and the epilogue compile, fit and pipeline, with wgmma where the tile
    allows it."""
    rep = reports[_spec(cfg, dtype, block_r, in_loop, adapter_dtype="fp32")["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"], rep
    if cfg.block_m >= 64:
        assert rep["wgmma"], f"{cfg}: no wgmma for a {cfg.block_m}-row tile"


@pytest.mark.parametrize("block_r,pre", TMA_VARIANTS, ids=lambda v: str(v))
def test_tma_kernel_with_fp32_adapters_compiles_for_hopper(reports, block_r, pre):
    """fp32 adapters on an fp16 base: every TMA tile compiles with wgmma; A's fp32 boxes
    double its shared memory, so a rank-64 in-loop shrink fits on fewer tiles (the tuner
    skips the others), but on at least one; every other variant fits on every tile."""
    fitting = []
    for cfg in TMA:
        rep = reports[_tma_spec(cfg, block_r, pre, "fp16", adapter_dtype="fp32")["id"]]
        assert "error" not in rep, rep.get("error")
        assert rep["pipelined"] and rep["wgmma"], rep
        if rep["shared"] <= HOPPER_MAX_SHARED:
            fitting.append(cfg)
        else:
            assert block_r > 16 and not pre, f"{cfg} needs {rep['shared']} B of shared memory"
    assert fitting, f"no TMA tile fits fp32 adapters at r={block_r} pre={pre}"


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
@pytest.mark.parametrize("adapter_dtype", ["", "fp32"], ids=["same", "fp32-adapters"])
def test_input_gradient_layout_compiles_for_hopper(reports, cfg, adapter_dtype):
    dtype = "fp16" if adapter_dtype else "bf16"
    rep = reports[_backward_spec(cfg, dtype, adapter_dtype=adapter_dtype)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"], rep


@pytest.mark.parametrize("cfg", TMA_SPLIT_K, ids=_cfg_id)
@pytest.mark.parametrize("block_r,pre", [(16, False), (32, True)], ids=lambda v: str(v))
def test_tma_split_k_compiles_for_hopper(reports, cfg, block_r, pre):
    """The persistent TMA kernel's split-K units (fp32 partial boxes) fit, pipeline and
    use wgmma, as the unsplit tiles do."""
    rep = reports[_tma_spec(cfg, block_r, pre)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"
    assert rep["pipelined"] and rep["wgmma"], rep


@pytest.mark.parametrize("cfg", TILE_SPLIT_K, ids=_cfg_id)
def test_wide_split_k_tiles_compile_for_hopper(reports, cfg):
    """Split-K beyond decode (64-row tiles at M = 128): fits, pipelines, uses wgmma."""
    rep = reports[_spec(cfg, "bf16", 16, True)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"] and rep["wgmma"], rep
