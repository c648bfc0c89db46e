"""Autograd of fastpeft::ia3_linear: the hand-derived backward vs autograd of the reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from numerics import TOL, rel_err

import fastpeft.methods.ia3.op as ops
from fastpeft.kernels.reference import ia3_linear_ref


# The Triton kernel's tiles only, never the library-GEMM variant (conftest.py).
pytestmark = pytest.mark.usefixtures("triton_tiles_only")


def _leaves(M, K, N, dtype, scale_input, base_grad=False, batch=()):
    x = torch.randn(*batch, M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5).requires_grad_(base_grad)
    b = torch.randn(N, device=DEVICE, dtype=dtype).requires_grad_(base_grad)
    l = (1 + 0.3 * torch.randn((1, K) if scale_input else (N, 1), device=DEVICE, dtype=dtype)).requires_grad_()
    return x, w, b, l


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("base_grad", [False, True])
def test_gradcheck_float64(scale_input, base_grad):
    """Finite differences on the torch backend: checks the backward formula itself."""
    x, w, b, l = _leaves(5, 7, 6, torch.float64, scale_input, base_grad, batch=(2,))
    x, w, b, l = (t.detach().cpu().requires_grad_(t.requires_grad) for t in (x, w, b, l))
    assert torch.autograd.gradcheck(
        lambda x, w, b, l: ops.ia3_linear(x, w, b, l, scale_input, backend="torch"), (x, w, b, l)
    )


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_gradients_match_float64_autograd(scale_input, dtype):
    """Three-way bound: each gradient vs float64 autograd of the reference, within
    max(TOL, 2x the error of PyTorch autograd of the reference in the same dtype)."""
    x, w, b, l = _leaves(11, 37, 29, dtype, scale_input, base_grad=True, batch=(3,))
    g = torch.randn(3, 11, 29, device=DEVICE, dtype=dtype)
    y = ops.ia3_linear(x, w, b, l, scale_input, backend="triton")
    grads = torch.autograd.grad(y, (x, w, b, l), g)
    same = torch.autograd.grad(ia3_linear_ref(x, w, b, l, scale_input), (x, w, b, l), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b, l)]
    refs = torch.autograd.grad(ia3_linear_ref(*leaves64, scale_input), leaves64, g.double())
    for name, got, ref, pt in zip(("x", "weight", "bias", "l"), grads, refs, same):
        assert got.shape == ref.shape and got.dtype == dtype, name
        bound = max(TOL[dtype], 2 * rel_err(pt, ref))
        assert rel_err(got, ref) <= bound, (name, rel_err(got, ref), bound)


def test_frozen_base_gets_no_gradient():
    x, w, b, l = _leaves(4, 9, 8, torch.float32, False)
    ops.ia3_linear(x, w, b, l, False, backend="triton").sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and l.grad is not None and l.grad.shape == l.shape


def test_zero_rows_backward():
    x, w, b, l = _leaves(0, 9, 8, torch.float32, True, base_grad=True)
    ops.ia3_linear(x, w, b, l, True, backend="triton").sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(l.grad) == 0


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(scale_input, use_triton):
    x, w, b, l = _leaves(5, 12, 10, torch.float32, scale_input)
    torch.library.opcheck(ops._ia3_linear_op, (x, w, b, l.reshape(-1), scale_input, use_triton))


def test_compiles_without_graph_breaks():
    x, w, b, l = _leaves(5, 12, 10, torch.float32, True)

    def f(x, l):
        return ops.ia3_linear(x, w, b, l, True, backend="torch") * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, l), f(x, l))


@pytest.mark.parametrize("scale_input", [False, True])
def test_wrong_vector_shape_raises(scale_input):
    x, w, b, l = _leaves(4, 9, 8, torch.float32, scale_input)
    bad = torch.ones(8, 1) if scale_input else torch.ones(1, 9)
    with pytest.raises(ValueError, match="ia3_l must have shape"):
        ops.ia3_linear(x, w, b, bad, scale_input)
    with pytest.raises(TypeError, match="floating-point"):
        ops.ia3_linear(x, w, b, torch.ones_like(l, dtype=torch.long), scale_input)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.ia3_linear(x, w, b, l, scale_input, backend="cuda")


def test_output_scaling_dx_runs_the_kernel(monkeypatch):
    """dx = (g * l) W is the input-scaling kernel over W^T: a second launch, no PyTorch GEMM."""
    calls = []
    real = ops._ia3_kernels.ia3_linear_fwd
    monkeypatch.setattr(ops._ia3_kernels, "ia3_linear_fwd", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    x, w, b, l = _leaves(6, 13, 10, torch.float32, False)
    g = torch.randn(6, 10, device=DEVICE)
    (dx,) = torch.autograd.grad(ops.ia3_linear(x, w, b, l, False, backend="triton"), [x], g)
    assert calls == [False, True]
    assert rel_err(dx, (g.double() * l.detach().double().reshape(-1)) @ w.double()) <= TOL[torch.float32]


@pytest.mark.parametrize("need_x", [True, False])
def test_input_scaling_backward_is_one_fused_kernel(monkeypatch, need_x):
    """dx = (g W) * l and dl = sum_m (g W) * x from the one kernel of kernels/ia3_train.py."""
    calls = []
    real = ops._ia3_train_kernels.ia3_grad_input_scaling
    monkeypatch.setattr(ops._ia3_train_kernels, "ia3_grad_input_scaling",
                        lambda *a, **k: calls.append(a[4:6]) or real(*a, **k))
    x, w, b, l = _leaves(9, 21, 13, torch.float16, True, batch=(2,))
    x = x.detach().transpose(0, 1).requires_grad_(need_x)  # rows through two strides
    g = torch.randn(9, 2, 13, device=DEVICE, dtype=torch.float16)
    leaves = [x, l] if need_x else [l]
    got = torch.autograd.grad(ops.ia3_linear(x, w, b, l, True, backend="triton"), leaves, g)
    assert calls == [(need_x, True)]
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = ia3_linear_ref(l64[0] if need_x else x.double(), w.double(), b.double(), l64[-1], True)
    for gg, ww in zip(got, torch.autograd.grad(ref, l64, g.double())):
        assert gg.dtype == torch.float16 and rel_err(gg, ww) <= TOL[torch.float16]


def test_opcheck_input_scaling_backward_op():
    x, w, b, l = _leaves(5, 12, 7, torch.float32, True)
    g = torch.randn(5, 7, device=DEVICE)
    torch.library.opcheck(ops._ia3_grad_in_op, (g, w.detach(), x.detach(), l.detach(), True, True))
