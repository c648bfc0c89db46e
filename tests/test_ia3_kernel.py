"""The fused (IA)^3 op (Triton kernel through fastpeft.methods.ia3.op) vs the float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from numerics import TOL, assert_matches_ref, rel_err

import fastpeft.methods.ia3.op as ops
from fastpeft.kernels import ia3 as ia3_kernels
from fastpeft.kernels.autotune import LIBRARY_GEMM
from fastpeft.kernels.reference import ia3_linear_ref

# (M, K, N): M in {0, 1, 5, 33}, K and N not multiples of 16.
SHAPES = [(0, 37, 45), (1, 16, 16), (5, 123, 123), (33, 70, 19), (17, 50, 61)]


# The Triton kernel's tiles only, never the library-GEMM variant (conftest.py).
pytestmark = pytest.mark.usefixtures("triton_tiles_only")


def _make(M, K, N, dtype, scale_input, bias=True, l_dtype=None):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    shape = (1, K) if scale_input else (N, 1)  # PEFT's checkpoint layout
    l = (1.0 + 0.5 * torch.randn(shape, device=DEVICE)).to(l_dtype or dtype)
    return x, w, b, l


def _ref64(x, w, b, l, scale_input):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return ia3_linear_ref(d(x), d(w), d(b), d(l), scale_input)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record launches of the Triton launcher: proof that the fused path ran."""
    calls = []
    real = ia3_kernels.ia3_linear_fwd

    def spy(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs["scale_input"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._ia3_kernels, "ia3_linear_fwd", spy)
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale_input", [False, True])
def test_forward_matches_reference(M, K, N, dtype, bias, scale_input, kernel_calls):
    x, w, b, l = _make(M, K, N, dtype, scale_input, bias)
    y = ops.ia3_linear(x, w, b, l, scale_input, backend="triton")
    assert kernel_calls == [scale_input], "the Triton launcher did not run"
    assert y.shape == (M, N) and y.dtype == dtype
    if M == 0:
        return
    assert_matches_ref(y, _ref64(x, w, b, l, scale_input), ia3_linear_ref(x, w, b, l, scale_input), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("scale_input", [False, True])
def test_fp32_vector_with_low_precision_input(dtype, scale_input, kernel_calls):
    """PEFT may keep ``l`` in fp32 while the base runs in fp16/bf16."""
    x, w, b, l = _make(9, 40, 30, dtype, scale_input, l_dtype=torch.float32)
    y = ops.ia3_linear(x, w, b, l, scale_input, backend="triton")
    assert kernel_calls and y.dtype == dtype
    assert_matches_ref(y, _ref64(x, w, b, l, scale_input), ia3_linear_ref(x, w, b, l, scale_input), dtype)


@pytest.mark.parametrize("scale_input", [False, True])
def test_batch_dims_and_strided_input(scale_input, kernel_calls):
    dtype = torch.float32
    _, w, b, l = _make(1, 24, 21, dtype, scale_input)
    base = torch.randn(7, 3, 48, device=DEVICE, dtype=dtype)
    cases = [
        base[..., :24],                      # row stride 48 (sliced features)
        base[..., ::2],                      # feature stride 2
        base[..., :24].transpose(0, 1),      # (3, 7, 24): leading dims need two strides
        torch.randn(2, 3, 4, 24, device=DEVICE).permute(2, 0, 1, 3),  # three strides: copied
    ]
    for x in cases:
        y = ops.ia3_linear(x, w, b, l, scale_input, backend="triton")
        assert y.shape == (*x.shape[:-1], 21)
        assert rel_err(y, _ref64(x, w, b, l, scale_input)) < 1e-5
    assert len(kernel_calls) == len(cases)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("scale_input", [False, True])
def test_every_output_element_written(dtype, scale_input):
    """Poisoned output: a missed tile or mask bug leaves NaN behind."""
    x, w, b, l = _make(37, 45, 77, dtype, scale_input)
    out = torch.full((37, 77), float("nan"), device=DEVICE, dtype=dtype)
    y = ia3_kernels.ia3_linear_fwd(x, w, b, l, scale_input, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, _ref64(x, w, b, l, scale_input)) <= TOL[dtype]


def test_one_d_and_two_d_vector_agree(kernel_calls):
    x, w, b, l = _make(5, 20, 12, torch.float32, False)
    y2 = ops.ia3_linear(x, w, b, l, False, backend="triton")
    y1 = ops.ia3_linear(x, w, b, l.reshape(-1), False, backend="triton")
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_torch_backend_is_reference():
    x, w, b, l = _make(6, 20, 12, torch.float32, True)
    y = ops.ia3_linear(x, w, b, l, True, backend="torch")
    torch.testing.assert_close(y, ia3_linear_ref(x, w, b, l, True))


def test_fp32_follows_matmul_precision_setting():
    from fastpeft.kernels.runtime import input_precision

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_library_gemm_variant(dtype, scale_input, bias):
    """The cuBLAS-plus-one-pass variant the GPU tuner may pick computes the same math."""
    for N in (19, 45):  # input scaling scales W when M > N, else x
        x, w, b, l = _make(33, 70, N, dtype, scale_input, bias, l_dtype=torch.float32)
        x = x.reshape(3, 11, 70)
        y = ia3_kernels.ia3_linear_fwd(x, w, b, l, scale_input, config=LIBRARY_GEMM)
        assert y.shape == (3, 11, N)
        assert_matches_ref(y, _ref64(x, w, b, l, scale_input), ia3_linear_ref(x, w, b, l, scale_input), dtype)
    y0 = ia3_kernels.ia3_linear_fwd(x[:0], w, b, l, scale_input, config=LIBRARY_GEMM)
    assert y0.shape == (0, 11, 45)
