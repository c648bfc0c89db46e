"""Every GPU launch config of the fused LoRA kernel compiles for Hopper (sm_90), fits in
its shared memory, is software-pipelined and uses wgmma where the tile allows it.

No GPU needed: triton compiles ahead of time with its bundled ptxas (see tests/sm90.py).
"""
from __future__ import annotations

from typing import Any, Dict

import pytest

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, pytest_progress, report_sm90
from sm90_specs import (
    FP32_ADAPTER_VARIANTS, FP32_LORA_TILES, FP32_TMA, LORA_TILES, LORA_VARIANTS, SPLIT_K, TMA, TMA_VARIANTS, cfg_id,
    lora_backward_spec, lora_spec, lora_tma_spec, lora_test_specs,
)

# On a GPU the CUDA tests compile and run the same kernels for real.
pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")


@pytest.fixture(scope="module")
def reports(pytestconfig) -> Dict[str, Dict[str, Any]]:
    return report_sm90(lora_test_specs(), progress=pytest_progress(pytestconfig))


@pytest.mark.parametrize("cfg", LORA_TILES, ids=cfg_id)
@pytest.mark.parametrize("block_r,in_loop", LORA_VARIANTS, ids=lambda v: str(v))
def test_bf16_lora_kernel_compiles_for_hopper(reports, cfg, block_r, in_loop):
    rep = reports[lora_spec(cfg, "bf16", block_r, in_loop)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"
    assert rep["pipelined"], f"{cfg}: the K loop's loads are not pipelined"
    if cfg.block_m >= 64:
        assert rep["wgmma"], f"{cfg}: no wgmma for a {cfg.block_m}-row tile"


@pytest.mark.parametrize("cfg", LORA_TILES, ids=cfg_id)
def test_fp16_lora_kernel_fits_hopper(reports, cfg):
    rep = reports[lora_spec(cfg, "fp16", 64, True)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"], rep


@pytest.mark.parametrize("cfg", FP32_LORA_TILES, ids=lambda c: f"{cfg_id(c)}k{c.split_k}")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_tiles_fit_hopper(reports, cfg, precision):
    """fp32 inputs get tiles sized for 4-byte elements: every one the tuner times fits,
    with tf32 on (HF Trainer's tf32=True) or off, forward and input-gradient layouts."""
    specs = [lora_spec(cfg, "fp32", r, loop, precision=precision) for r, loop in ((64, True), (32, False))]
    specs.append(lora_backward_spec(cfg, "fp32", precision))
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
        rep = reports[lora_tma_spec(cfg, block_r, pre, "fp32", "tf32")["id"]]
        assert "error" not in rep, rep.get("error")
        if rep["shared"] <= HOPPER_MAX_SHARED:
            assert rep["pipelined"] and rep["wgmma"], rep
            fitting.append(cfg)
    assert fitting, f"no fp32 TMA tile fits for r={block_r} pre={pre}"


@pytest.mark.parametrize("cfg", SPLIT_K, ids=lambda c: f"{cfg_id(c)}k{c.split_k}")
@pytest.mark.parametrize("block_r,in_loop", [(16, True), (32, False)], ids=lambda v: str(v))
def test_split_k_variants_compile_for_hopper(reports, cfg, block_r, in_loop):
    rep = reports[lora_spec(cfg, "bf16", block_r, in_loop)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"]


def test_split_k_reduce_compiles_for_hopper(reports):
    assert "error" not in reports["splitk-reduce"], reports["splitk-reduce"].get("error")


@pytest.mark.parametrize("cfg", TMA, ids=cfg_id)
@pytest.mark.parametrize("block_r,pre", TMA_VARIANTS, ids=lambda v: str(v))
def test_tma_kernel_compiles_for_hopper(reports, cfg, block_r, pre):
    rep = reports[lora_tma_spec(cfg, block_r, pre)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["pipelined"] and rep["wgmma"], rep
    # A rank-64 shrink on the widest tile may not fit: the tuner skips a config whose
    # launch runs out of shared memory. Everything else must fit.
    if block_r <= 16 or pre or cfg.block_n <= 128:
        assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"


@pytest.mark.parametrize("cfg", LORA_TILES, ids=cfg_id)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("block_r,in_loop", FP32_ADAPTER_VARIANTS, ids=lambda v: str(v))
def test_fp32_adapters_on_a_half_base_fit_hopper(reports, cfg, dtype, block_r, in_loop):
    """fp32 adapters on a 16-bit base keep the LoRA branch in fp32 (tf32 dots): the
    in-loop shrink and the epilogue compile, fit and pipeline, with wgmma where the tile
    allows it."""
    rep = reports[lora_spec(cfg, dtype, block_r, in_loop, adapter_dtype="fp32")["id"]]
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
        rep = reports[lora_tma_spec(cfg, block_r, pre, "fp16", adapter_dtype="fp32")["id"]]
        assert "error" not in rep, rep.get("error")
        assert rep["pipelined"] and rep["wgmma"], rep
        if rep["shared"] <= HOPPER_MAX_SHARED:
            fitting.append(cfg)
        else:
            assert block_r > 16 and not pre, f"{cfg} needs {rep['shared']} B of shared memory"
    assert fitting, f"no TMA tile fits fp32 adapters at r={block_r} pre={pre}"


@pytest.mark.parametrize("cfg", LORA_TILES, ids=cfg_id)
@pytest.mark.parametrize("adapter_dtype", ["", "fp32"], ids=["same", "fp32-adapters"])
def test_input_gradient_layout_compiles_for_hopper(reports, cfg, adapter_dtype):
    dtype = "fp16" if adapter_dtype else "bf16"
    rep = reports[lora_backward_spec(cfg, dtype, adapter_dtype=adapter_dtype)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED and rep["pipelined"], rep
