"""The LoRA training kernels and the (IA)^3 input-scaling backward compile for Hopper
(sm_90), fit in its shared memory and are pipelined, for tiles the GPU tuner can pick
(bf16; fp16 with fp32 adapters). No GPU needed (see tests/sm90.py)."""
from __future__ import annotations

from typing import Any, Dict, List

import pytest

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, report_sm90

from fastpeft.kernels import autotune

pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")

MODULE = "fastpeft.kernels.lora_train"
# (block_m, block_n, block_k, num_warps): the largest tiles of the reduction candidates.
REDUCE_TILES = [(64, 128, 128, 8), (128, 64, 64, 8)]


def _spec(kernel: str, tile, dtype: str, adapter: str, ptrs: Dict[str, str], consts: Dict[str, Any], units,
          floats) -> Dict[str, Any]:
    bm, bn, bk, warps = tile
    return {
        "id": f"{kernel}-{dtype}-{adapter}-{bm}x{bn}x{bk}w{warps}",
        "module": MODULE,
        "kernel": kernel,
        "ptr_dtypes": ptrs,
        "constexprs": dict(consts, LORA_FP32=adapter != dtype, INPUT_PRECISION="ieee"),
        "unit_args": units,
        "float_args": floats,
        "num_warps": warps,
        "num_stages": 3,
    }


def _specs(tile, dtype: str, adapter: str, block_r: int) -> List[Dict[str, Any]]:
    bm, bn, bk, _ = tile
    xa = "fp32" if adapter != dtype else dtype
    return [
        _spec("_dropout_shrink_kernel", tile, dtype, adapter,
              {"x_ptr": dtype, "a_ptr": adapter, "seed_ptr": "i64", "s_ptr": "fp32"},
              dict(DROPOUT=True, ATOMIC=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r),
              ["stride_xk", "stride_ak", "stride_sr"], ["p", "keep_scale"]),
        _spec("_grad_shrink_kernel", tile, dtype, adapter,
              {"g_ptr": dtype, "b_ptr": adapter, "s_ptr": xa, "ds_ptr": "fp32", "db_ptr": "fp32"},
              dict(NEED_DB=True, DS_ATOMIC=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r),
              ["stride_gn", "stride_br", "stride_sr", "stride_dsr", "stride_dbr"], ["scaling"]),
        _spec("_grad_a_kernel", tile, dtype, adapter,
              {"ds_ptr": "fp32", "x_ptr": dtype, "seed_ptr": "i64", "da_ptr": "fp32"},
              dict(DROPOUT=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=block_r),
              ["stride_xk", "stride_dsr", "stride_dak"], ["p", "keep_scale"]),
    ]


def _dx_spec(cfg, dtype: str, adapter: str) -> Dict[str, Any]:
    tile = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps)
    spec = _spec("_grad_dx_kernel", tile, dtype, adapter,
                 {"g_ptr": dtype, "w_ptr": dtype, "ds_ptr": "fp32", "a_ptr": adapter, "seed_ptr": "i64",
                  "dx_ptr": dtype},
                 dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=32,
                      GROUP_M=cfg.group_m),
                 ["stride_gn", "stride_wk", "stride_dsr", "stride_ak", "stride_dxk"], ["p", "keep_scale"])
    spec["module"] = "fastpeft.kernels.lora_grad_dx"
    return spec


def _ia3_grad_spec(cfg) -> Dict[str, Any]:
    spec = _spec("_ia3_grad_in_kernel", (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps), "bf16", "bf16",
                 {"g_ptr": "bf16", "w_ptr": "bf16", "x_ptr": "bf16", "l_ptr": "bf16", "dx_ptr": "bf16",
                  "dl_ptr": "fp32"},
                 dict(NEED_DX=True, NEED_DL=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      GROUP_M=cfg.group_m),
                 ["stride_gn", "stride_wk", "stride_xk", "stride_l", "stride_dxk"], [])
    spec["module"] = "fastpeft.kernels.ia3_train"
    del spec["constexprs"]["LORA_FP32"]
    return spec


def test_training_kernels_compile_fit_and_pipeline():
    prefill = autotune.gemm_candidates(4096)
    # bf16 for every kernel; fp16 with fp32 adapters (tf32 dots) for the dS/dB kernel.
    specs = _specs(REDUCE_TILES[0], "bf16", "bf16", 64) + [_specs(REDUCE_TILES[1], "fp16", "fp32", 16)[1]]
    specs.append(_dx_spec(prefill[0], "bf16", "bf16"))
    specs.append(_ia3_grad_spec(prefill[0]))
    report = report_sm90(specs)
    for spec in specs:
        got = report[spec["id"]]
        assert "error" not in got, (spec["id"], got.get("error"))
        assert got["shared"] <= HOPPER_MAX_SHARED, (spec["id"], got["shared"])
        assert got["pipelined"], spec["id"]
    for spec in specs[-2:]:
        assert report[spec["id"]]["wgmma"], f"{spec['id']}: the GEMM should run on Hopper's warp-group MMA"
