"""Every GPU launch config of the (IA)^3 and bottleneck kernels compiles for Hopper
(sm_90), fits in its shared memory, is software-pipelined and uses wgmma where the tile
allows it. No GPU needed (see tests/sm90.py)."""
from __future__ import annotations

from typing import Any, Dict

import pytest
import torch

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, pytest_progress, report_sm90
from sm90_specs import bn_spec, cfg_id, gemm_configs, ia3_bn_test_specs, ia3_spec

from fastpeft.kernels import bottleneck as bn_kernels

CANDIDATES = gemm_configs()
# fp32 inputs: the tiles sized for 4-byte elements, with tf32 on (the larger case).
FP32_CANDIDATES = gemm_configs(torch.float32)


# On a GPU the CUDA tests compile and run these kernels for real; this ahead-of-time
# check (about a minute of compiling) is for machines without one.
pytestmark = pytest.mark.skipif(ON_GPU, reason="a CUDA GPU compiles the kernels for real in the other tests")


@pytest.fixture(scope="module")
def reports(pytestconfig) -> Dict[str, Dict[str, Any]]:
    return report_sm90(ia3_bn_test_specs(), progress=pytest_progress(pytestconfig))


def _check(rep, cfg):
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{cfg} needs {rep['shared']} B of shared memory"
    assert rep["pipelined"], f"{cfg}: the K loop's loads are not pipelined"
    if cfg.block_m >= 64:
        assert rep["wgmma"], f"{cfg}: no wgmma for a {cfg.block_m}-row tile"


@pytest.mark.parametrize("cfg", CANDIDATES, ids=cfg_id)
@pytest.mark.parametrize("scale_input", [False, True])
def test_bf16_ia3_kernel_compiles_for_hopper(reports, cfg, scale_input):
    _check(reports[ia3_spec(cfg, scale_input)["id"]], cfg)


@pytest.mark.parametrize("cfg", CANDIDATES, ids=cfg_id)
@pytest.mark.parametrize("act", [1, 3])
def test_bf16_bottleneck_kernel_compiles_for_hopper(reports, cfg, act):
    _check(reports[bn_spec(cfg, act)["id"]], cfg)


@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_bf16_bottleneck_epilogue_only_compiles_for_hopper(reports, act):
    """The in-place epilogue of the LIBRARY_GEMM variant (no K loop, nothing to pipeline)."""
    cfg = bn_kernels.EPILOGUE_CONFIG
    rep = reports[bn_spec(cfg, act, has_gemm=False)["id"]]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED
    assert rep["wgmma"], "the up-projection dot of a 64-row tile should use wgmma"


@pytest.mark.parametrize("cfg", FP32_CANDIDATES, ids=cfg_id)
def test_fp32_tf32_tiles_fit_hopper(reports, cfg):
    """fp32 inputs with tf32 on: every tile the tuner times fits and is pipelined."""
    for spec in (ia3_spec(cfg, False, "fp32", "tf32"), ia3_spec(cfg, True, "fp32", "tf32"),
                 bn_spec(cfg, 1, "fp32", precision="tf32")):
        rep = reports[spec["id"]]
        assert "error" not in rep, rep.get("error")
        assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec['id']} needs {rep['shared']} B of shared memory"
        assert rep["pipelined"], spec["id"]
