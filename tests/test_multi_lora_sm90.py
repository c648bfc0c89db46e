"""The mixed-adapter kernels compile for Hopper (sm_90) in every GPU launch config the
launcher can pick, and fit in shared memory. No GPU needed (see tests/sm90.py)."""
from __future__ import annotations

from typing import Any, Dict

import pytest

from conftest import ON_GPU
from sm90 import HOPPER_MAX_SHARED, pytest_progress, report_sm90
from sm90_specs import mlora_test_specs

# On a GPU the CUDA tests compile and run the same kernels for real.
pytestmark = pytest.mark.skipif(ON_GPU, reason="ahead-of-time check for machines without a GPU")


@pytest.fixture(scope="module")
def reports(pytestconfig) -> Dict[str, Dict[str, Any]]:
    return report_sm90(mlora_test_specs(), progress=pytest_progress(pytestconfig))


@pytest.mark.parametrize("spec_id", [s["id"] for s in mlora_test_specs()])
def test_compiles_for_sm90_and_fits_shared_memory(reports, spec_id):
    rep = reports[spec_id]
    assert "error" not in rep, rep.get("error")
    assert rep["shared"] <= HOPPER_MAX_SHARED, f"{spec_id} needs {rep['shared']} B of shared memory"
