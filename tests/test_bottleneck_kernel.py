"""The fused bottleneck-adapter op (Triton through fastpeft.methods.bottleneck.op) vs float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from numerics import TOL, assert_matches_ref, rel_err

import fastpeft.methods.bottleneck.op as ops
from fastpeft.kernels import bottleneck as bn_kernels
from fastpeft.kernels.autotune import LIBRARY_GEMM
from fastpeft.kernels.reference import bottleneck_linear_ref

ACTS = ["relu", "gelu", "silu", "swish", "tanh"]
# (M, K, N, D): M in {0, 1, 5, 33}; K, N, D not multiples of 16; D below and above
# the kernel's D chunk (32).
SHAPES = [(0, 37, 45, 8), (1, 16, 16, 4), (5, 123, 61, 20), (33, 70, 19, 7), (17, 30, 50, 45)]


# The Triton kernel's tiles only, never the library-GEMM variant (conftest.py).
pytestmark = pytest.mark.usefixtures("triton_tiles_only")


def _make(M, K, N, D, dtype, bias=True, adapter_bias=True):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    dw = torch.randn(D, N, device=DEVICE, dtype=dtype) / N**0.5
    db = torch.randn(D, device=DEVICE, dtype=dtype) * 0.5 if adapter_bias else None
    uw = torch.randn(N, D, device=DEVICE, dtype=dtype) / D**0.5
    ub = torch.randn(N, device=DEVICE, dtype=dtype) * 0.5 if adapter_bias else None
    return x, w, b, dw, db, uw, ub


def _ref64(x, w, b, dw, db, uw, ub, s, act):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return bottleneck_linear_ref(d(x), d(w), d(b), d(dw), d(db), d(uw), d(ub), s, act)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record launches of the Triton launcher: proof that the fused path ran."""
    calls = []
    real = bn_kernels.bottleneck_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._bn_kernels, "bottleneck_linear_fwd", spy)
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,D", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(M, K, N, D, dtype, bias, kernel_calls):
    x, w, b, dw, db, uw, ub = _make(M, K, N, D, dtype, bias, adapter_bias=bias)
    y = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.7, "gelu", backend="triton")
    assert kernel_calls, "the Triton launcher did not run"
    assert y.shape == (M, N) and y.dtype == dtype
    if M == 0:
        return
    ref = _ref64(x, w, b, dw, db, uw, ub, 0.7, "gelu")
    same = bottleneck_linear_ref(x, w, b, dw, db, uw, ub, 0.7, "gelu")
    assert_matches_ref(y, ref, same, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_every_activation(act, dtype, kernel_calls):
    x, w, b, dw, db, uw, ub = _make(13, 40, 36, 12, dtype)
    y = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 1.5, act, backend="triton")
    assert kernel_calls
    ref = _ref64(x, w, b, dw, db, uw, ub, 1.5, act)
    assert_matches_ref(y, ref, bottleneck_linear_ref(x, w, b, dw, db, uw, ub, 1.5, act), dtype)
    # The adapter branch alone (y - h) is checked too: a large base must not hide it.
    h64 = torch.nn.functional.linear(x.double(), w.double(), b.double())
    branch_err = rel_err(y.double() - h64, ref - h64)
    assert branch_err < (1e-5 if dtype == torch.float32 else 5e-2), branch_err


def test_large_preactivations_saturate():
    """tanh/silu/gelu at |z| ~ 100 must not overflow to NaN/inf in the kernel."""
    x, w, b, dw, db, uw, ub = _make(6, 20, 24, 8, torch.float32)
    dw = dw * 300.0
    for act in ACTS:
        y = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 1.0, act, backend="triton")
        assert rel_err(y, _ref64(x, w, b, dw, db, uw, ub, 1.0, act)) < 1e-5, act


def test_batch_dims_and_strided_input(kernel_calls):
    _, w, b, dw, db, uw, ub = _make(1, 24, 21, 9, torch.float32)
    base = torch.randn(7, 3, 48, device=DEVICE)
    cases = [
        base[..., :24],
        base[..., ::2],
        base[..., :24].transpose(0, 1),
        torch.randn(2, 3, 4, 24, device=DEVICE).permute(2, 0, 1, 3),
    ]
    for x in cases:
        y = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.5, "relu", backend="triton")
        assert y.shape == (*x.shape[:-1], 21)
        assert rel_err(y, _ref64(x, w, b, dw, db, uw, ub, 0.5, "relu")) < 1e-5
    assert len(kernel_calls) == len(cases)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_every_output_element_written(dtype):
    x, w, b, dw, db, uw, ub = _make(37, 45, 77, 40, dtype)
    out = torch.full((37, 77), float("nan"), device=DEVICE, dtype=dtype)
    y = bn_kernels.bottleneck_linear_fwd(x, w, b, dw, db, uw, ub, 0.5, "silu", out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, _ref64(x, w, b, dw, db, uw, ub, 0.5, "silu")) <= TOL[dtype]


def test_precomputed_down_eff_is_used(kernel_calls):
    x, w, b, dw, db, uw, ub = _make(5, 20, 18, 6, torch.float32)
    w_eff, b_eff = ops.bottleneck_down_eff(w, b, dw, db)
    y1 = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.5, "tanh", w_eff=w_eff, b_eff=b_eff, backend="triton")
    y2 = ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.5, "tanh", backend="triton")
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="both w_eff and b_eff"):
        ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 0.5, "tanh", w_eff=w_eff)


def test_zero_up_projection_is_identity(kernel_calls):
    """Init near identity: with Wu = 0 and bu = 0 the layer is its base linear."""
    x, w, b, dw, db, uw, ub = _make(9, 30, 26, 8, torch.float32)
    y = ops.bottleneck_linear(x, w, b, dw, db, torch.zeros_like(uw), torch.zeros_like(ub), 1.0, "relu",
                              backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clearly():
    x, w, b, dw, db, uw, ub = _make(4, 20, 18, 6, torch.float32)
    with pytest.raises(ValueError, match="unknown non-linearity 'mish'"):
        ops.bottleneck_linear(x, w, b, dw, db, uw, ub, 1.0, "mish")
    with pytest.raises(ValueError, match="down_w must have shape"):
        ops.bottleneck_linear(x, w, b, dw.t(), db, uw, ub, 1.0, "relu")
    with pytest.raises(ValueError, match="up_w must have shape"):
        ops.bottleneck_linear(x, w, b, dw, db, uw[:, :3], ub, 1.0, "relu")
    with pytest.raises(ValueError, match="down_b must have shape"):
        ops.bottleneck_linear(x, w, b, dw, db[:2], uw, ub, 1.0, "relu")
    with pytest.raises(TypeError, match="down_w must be a floating-point tensor"):
        ops.bottleneck_linear(x, w, b, dw.to(torch.int32), db, uw, ub, 1.0, "relu")
    with pytest.raises(ValueError, match="last dimension 20"):
        ops.bottleneck_linear(x[:, :5], w, b, dw, db, uw, ub, 1.0, "relu")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_library_gemm_variant(dtype, bias):
    """cuBLAS h, then the same Triton kernel as an in-place epilogue (HAS_GEMM=False)."""
    x, w, b, dw, db, uw, ub = _make(33, 70, 19, 40, dtype, bias, adapter_bias=bias)
    x = x.reshape(3, 11, 70)
    out = torch.full((3, 11, 19), float("nan"), device=DEVICE, dtype=dtype)
    y = bn_kernels.bottleneck_linear_fwd(x, w, b, dw, db, uw, ub, 0.8, "gelu",
                                         config=LIBRARY_GEMM, out=out)
    ref = _ref64(x, w, b, dw, db, uw, ub, 0.8, "gelu")
    assert_matches_ref(y, ref, bottleneck_linear_ref(x, w, b, dw, db, uw, ub, 0.8, "gelu"), dtype)
