"""Every GPU launch config of the (IA)^3 and bottleneck kernels compiles for Hopper
(sm_90), fits in its shared memory, is software-pipelined and uses wgmma where the tile
allows it. No GPU needed (see tests/sm90.py)."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, report_sm90

from fastpeft.kernels import autotune
from fastpeft.kernels import bottleneck as bn_kernels

CANDIDATES = sorted(
    {cfg for m in (1, 64, 4096) for cfg in autotune.gemm_candidates(m)},
    key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages),
)

# fp32 inputs: the tiles sized for 4-byte elements, with tf32 on (the larger case).
FP32_CANDIDATES = sorted(
    {cfg for m in (1, 64, 4096) for cfg in autotune.gemm_candidates(m, torch.float32)},
    key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages),
)


def _cfg_id(cfg) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"


def _ia3_spec(cfg, scale_input: bool, dtype: str = "bf16", precision: str = "ieee") -> Dict[str, Any]:
    return {
        "id": f"ia3-{dtype}-{_cfg_id(cfg)}-{'in' if scale_input else 'out'}-{precision}",
        "module": "fastpeft.kernels.ia3",
        "kernel": "_ia3_linear_fwd_kernel",
        "ptr_dtypes": {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "l_ptr": "fp32", "y_ptr": dtype},
        "constexprs": dict(HAS_BIAS=True, SCALE_INPUT=scale_input, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, INPUT_PRECISION=precision),
        "unit_args": ["stride_xk", "stride_wk", "stride_l", "stride_yn"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _bn_spec(cfg, act: int, dtype: str = "bf16", has_gemm: bool = True, precision: str = "ieee") -> Dict[str, Any]:
    return {
        "id": f"bn-{dtype}-{_cfg_id(cfg)}-act{act}-{'gemm' if has_gemm else 'epi'}-{precision}",
        "module": "fastpeft.kernels.bottleneck",
        "kernel": "_bottleneck_linear_fwd_kernel",
        "ptr_dtypes": {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "z_ptr": dtype, "beff_ptr": "fp32",
                       "up_ptr": dtype, "upb_ptr": dtype, "y_ptr": dtype},
        "constexprs": dict(HAS_GEMM=has_gemm, HAS_BIAS=has_gemm, HAS_UP_BIAS=True, ACTIVATION=act, BLOCK_M=cfg.block_m,
                           BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=bn_kernels.BLOCK_D,
                           GROUP_M=cfg.group_m, INPUT_PRECISION=precision),
        "unit_args": ["stride_xk", "stride_wk", "stride_zd", "stride_ud", "stride_yn"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _all_specs() -> List[Dict[str, Any]]:
    specs = [_ia3_spec(c, s) for c in CANDIDATES for s in (False, True)]
    specs += [_bn_spec(c, a) for c in CANDIDATES for a in (1, 3)]  # gelu (erf), tanh
    specs += [_bn_spec(bn_kernels.EPILOGUE_CONFIG, a, has_gemm=False) for a in (0, 1, 2, 3)]
    specs += [_ia3_spec(c, s, "fp32", "tf32") for c in FP32_CANDIDATES for s in (False, True)]
    specs += [_bn_spec(c, 1, "fp32", precision="tf32") for c in FP32_CANDIDATES]
    return specs


# On a GPU the CUDA tests compile and run these kernels for real; this ahead-of-time
# check (about a minute of compiling) is for machines without one.
pytestmark = pytest.mark.skipif(ON_GPU, reason="a CUDA GPU compiles the kernels for real in the other tests")


@pytest.fixture(scope="module")
def reports() -> Dict[str, Dict[str, Any]]:
    return report_sm90(_all_specs())


def _check(rep, cfg):
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"
    assert rep["pipelined"], f"{cfg}: the K loop's loads are not pipelined"
    if cfg.block_m >= 64:
        assert rep["wgmma"], f"{cfg}: no wgmma for a {cfg.block_m}-row tile"


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
@pytest.mark.parametrize("scale_input", [False, True])
def test_bf16_ia3_kernel_compiles_for_hopper(reports, cfg, scale_input):
    _check(reports[_ia3_spec(cfg, scale_input)["id"]], cfg)


@pytest.mark.parametrize("cfg", CANDIDATES, ids=_cfg_id)
@pytest.mark.parametrize("act", [1, 3])
def test_bf16_bottleneck_kernel_compiles_for_hopper(reports, cfg, act):
    _check(reports[_bn_spec(cfg, act)["id"]], cfg)


@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_bf16_bottleneck_epilogue_only_compiles_for_hopper(reports, act):
    """The in-place epilogue of the LIBRARY_GEMM variant (no K loop, nothing to pipeline)."""
    cfg = bn_kernels.EPILOGUE_CONFIG
    rep = reports[_bn_spec(cfg, act, has_gemm=False)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED
    assert rep["wgmma"], "the up-projection dot of a 64-row tile should use wgmma"


@pytest.mark.parametrize("cfg", FP32_CANDIDATES, ids=_cfg_id)
def test_fp32_tf32_tiles_fit_hopper(reports, cfg):
    """fp32 inputs with tf32 on: every tile the tuner times fits and is pipelined."""
    for spec in (_ia3_spec(cfg, False, "fp32", "tf32"), _ia3_spec(cfg, True, "fp32", "tf32"),
                 _bn_spec(cfg, 1, "fp32", precision="tf32")):
        rep = reports[spec["id"]]
        assert "error" not in rep, rep.get("error")
        assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec['id']} needs {rep['shared']} B of shared memory"
        assert rep["pipelined"], spec["id"]
