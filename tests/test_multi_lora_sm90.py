"""The mixed-adapter kernels compile for Hopper (sm_90) in every GPU launch config the
launcher can pick, and fit in shared memory. No GPU needed (see tests/sm90.py)."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, report_sm90

from fastpeft.kernels import autotune
from fastpeft.kernels.multi_lora_meta import gather_block_r

# On a GPU the CUDA tests compile and run the same kernels for real.
pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")

I32 = "i32"
CANDIDATES = sorted(
    {cfg for m in (1, 64, 4096) for cfg in autotune.gemm_candidates(m)},
    key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages),
)


def _expand(
    cfg, dtype: str, fuse: bool, split_k: int, block_r: int = 16, gather: bool = False, precision: str = "ieee",
    adapter_dtype: str = "",
) -> Dict[str, Any]:
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    return {
        "id": f"expand-{dtype}{tag}-{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
              f"-{'fused' if fuse else 'split'}-k{split_k}-r{block_r}{'-gather' if gather else ''}-{precision}",
        "module": "fastpeft.kernels.multi_lora",
        "kernel": "_mlora_expand_kernel",
        "ptr_dtypes": {
            "x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "b_ptr": adapter_dtype or dtype, "xa_ptr": "fp32",
            "y_ptr": dtype,
            "sorted_rows_ptr": I32, "sorted_slot_ptr": I32, "seg_end_ptr": I32, "rank_ptr": I32,
            "scaling_ptr": "fp32",
        },
        "constexprs": dict(
            FUSE_BASE=fuse, HAS_BIAS=True, GATHER=gather, SPLIT_K=split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            LORA_FP32=bool(adapter_dtype) and adapter_dtype != dtype and dtype != "fp32", INPUT_PRECISION=precision,
        ),
        "unit_args": ["stride_xk", "stride_wk", "stride_br", "stride_xar", "stride_yn"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _shrink(dtype: str, block_m: int, block_r: int = 16, adapter_dtype: str = "") -> Dict[str, Any]:
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    return {
        "id": f"shrink-{dtype}{tag}-m{block_m}-r{block_r}",
        "module": "fastpeft.kernels.multi_lora",
        "kernel": "_mlora_shrink_kernel",
        "ptr_dtypes": {
            "x_ptr": dtype, "a_ptr": adapter_dtype or dtype, "xa_ptr": "fp32", "sorted_rows_ptr": I32, "slot_rows_ptr": I32,
            "slot_start_ptr": I32, "rank_ptr": I32,
        },
        "constexprs": dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=block_r,
                           LORA_FP32=bool(adapter_dtype) and adapter_dtype != dtype, INPUT_PRECISION="ieee"),
        "unit_args": ["stride_xk", "stride_ak", "stride_xar"],
        "num_warps": 4,
        "num_stages": 3,
    }


def _all_specs() -> List[Dict[str, Any]]:
    specs = [_expand(c, "bf16", fuse, 1 if fuse else 4) for c in CANDIDATES for fuse in (True, False)]
    specs += [_expand(CANDIDATES[0], "fp16", True, 8, 32)]
    # fp32 inputs (tf32 on): the tiles the tuner times for 4-byte elements, both base modes
    fp32 = sorted({c for m in (1, 64, 4096) for c in autotune.gemm_candidates(m, torch.float32)},
                  key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))
    specs += [_expand(c, "fp32", fuse, 1 if fuse else 4, 32, precision="tf32") for c in fp32 for fuse in (True, False)]
    # the gathering expand, on the decode tiles (M <= GATHER_MAX_M) it is picked for
    small = sorted({c for m in (1, 64) for c in autotune.gemm_candidates(m)},
                   key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))
    specs += [_expand(c, "bf16", fuse, 8, gather_block_r(c), gather=True) for c in small for fuse in (True, False)]
    specs += [_expand(small[0], "fp16", True, 1, 8, gather=True)]
    small32 = sorted({c for m in (1, 64) for c in autotune.gemm_candidates(m, torch.float32)},
                     key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages))
    specs += [_expand(c, "fp32", True, 1, gather_block_r(c), gather=True, precision="tf32") for c in small32]
    specs += [_shrink(dt, bm) for dt in ("bf16", "fp16") for bm in (16, 64)]
    # fp32 adapters on a 16-bit base (the layers' own adapters under batch_adapters): the
    # branch keeps fp32 range (tf32 dots in the shrink and the segment walk).
    specs += [_shrink(dt, bm, adapter_dtype="fp32") for dt in ("bf16", "fp16") for bm in (16, 64)]
    specs += [_expand(c, "fp16", fuse, 1 if fuse else 4, adapter_dtype="fp32") for c in CANDIDATES for fuse in (True, False)]
    specs += [_expand(c, "fp16", True, 8, gather_block_r(c), gather=True, adapter_dtype="fp32") for c in small]
    return specs


@pytest.fixture(scope="module")
def reports() -> Dict[str, Dict[str, Any]]:
    return report_sm90(_all_specs())


@pytest.mark.parametrize("spec_id", [s["id"] for s in _all_specs()])
def test_compiles_for_sm90_and_fits_shared_memory(reports, spec_id):
    rep = reports[spec_id]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec_id} needs {rep['shared']} B of shared memory"
