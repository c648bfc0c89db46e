"""Autograd of fastpeft::bottleneck_linear: the derived backward vs autograd of the reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from numerics import TOL, rel_err

import fastpeft.methods.bottleneck.op as ops
from fastpeft.kernels.reference import bottleneck_linear_ref

ACTS = ["relu", "gelu", "silu", "tanh"]


# The Triton kernel's tiles only, never the library-GEMM variant (conftest.py).
pytestmark = pytest.mark.usefixtures("triton_tiles_only")


def _leaves(M, K, N, D, dtype, base_grad=False, batch=(), dev=DEVICE):
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=dev, dtype=dtype) * scale)  # noqa: E731
    x = mk(*batch, M, K).requires_grad_()
    w = mk(N, K, scale=K**-0.5).requires_grad_(base_grad)
    b = mk(N).requires_grad_(base_grad)
    dw = mk(D, N, scale=N**-0.5).requires_grad_()
    db = mk(D, scale=0.5).requires_grad_()
    uw = mk(N, D, scale=D**-0.5).requires_grad_()
    ub = mk(N, scale=0.5).requires_grad_()
    return x, w, b, dw, db, uw, ub


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("M,D", [(5, 3), (2, 9)])  # both dWd forms: reassociated and recomputed h
def test_gradcheck_float64(act, M, D):
    leaves = _leaves(M, 7, 6, D, torch.float64, base_grad=True, batch=(2,), dev="cpu")
    # relu's kink at 0 is met with probability ~0 by these random pre-activations.
    assert torch.autograd.gradcheck(
        lambda *t: ops.bottleneck_linear(*t, 0.8, act, backend="torch"), leaves, atol=1e-6
    )


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,D", [(9, 12), (40, 4)])  # both dWd forms
def test_triton_gradients_match_float64_autograd(act, dtype, M, D):
    """Three-way bound: each gradient vs float64 autograd of the reference, within
    max(TOL, 2x the error of PyTorch autograd of the reference in the same dtype)."""
    leaves = _leaves(M, 37, 29, D, dtype, base_grad=True, batch=(3,))
    g = torch.randn(3, M, 29, device=DEVICE, dtype=dtype)
    y = ops.bottleneck_linear(*leaves, 0.6, act, backend="triton")
    grads = torch.autograd.grad(y, leaves, g)
    same = torch.autograd.grad(bottleneck_linear_ref(*leaves, 0.6, act), leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    refs = torch.autograd.grad(bottleneck_linear_ref(*leaves64, 0.6, act), leaves64, g.double())
    names = ("x", "weight", "bias", "down_w", "down_b", "up_w", "up_b")
    for name, got, ref, pt in zip(names, grads, refs, same):
        assert got.shape == ref.shape and got.dtype == dtype, name
        bound = max(TOL[dtype], 2 * rel_err(pt, ref))
        assert rel_err(got, ref) <= bound, (name, rel_err(got, ref), bound)


def test_frozen_base_gets_no_gradient():
    x, w, b, dw, db, uw, ub = _leaves(4, 9, 8, 3, torch.float32)
    ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 1.0, "relu", backend="triton").sum().backward()
    assert w.grad is None and b.grad is None
    assert all(t.grad is not None for t in (x, dw, db, uw, ub))


def test_no_biases_and_zero_rows():
    x, w, _, dw, _, uw, _ = _leaves(0, 9, 8, 3, torch.float32)
    ops.bottleneck_linear(x, w, None, dw, None, uw, None, 1.0, "gelu", backend="triton").sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(uw.grad) == 0


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(use_triton):
    x, w, b, dw, db, uw, ub = _leaves(5, 12, 10, 4, torch.float32)
    torch.library.opcheck(ops._bottleneck_linear_op, (x, w, b, dw, db, uw, ub, 0.5, "silu", None, None, use_triton))


def test_compiles_without_graph_breaks():
    x, w, b, dw, db, uw, ub = _leaves(5, 12, 10, 4, torch.float32)

    def f(x):
        return ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.5, "tanh", backend="torch") + 1

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
