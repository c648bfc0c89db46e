"""Shared numerics for tests: errors against a float64 reference, three-way bounds."""
from __future__ import annotations

import torch

# Upper bounds on ||out - ref|| / ||ref|| for a fused kernel, by input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm; NaN/inf in ``out`` never passes."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output holds NaN or inf (unwritten or overflowed elements)"
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_matches_ref(out: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor, dtype) -> None:
    """Kernel vs float64 reference, bounded by max(dtype tolerance, 2x PyTorch's own error)."""
    err = rel_err(out, ref64)
    bound = max(TOL[dtype], 2.0 * rel_err(torch_same_dtype, ref64))
    assert err <= bound, f"relative error {err:.3e} > bound {bound:.3e} ({dtype})"
