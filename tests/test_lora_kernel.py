"""The fused LoRA linear op (Triton kernel through fastpeft.methods.lora.op) vs the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, KERNEL_DTYPES
from numerics import assert_matches_ref, rel_err

import fastpeft.core.dispatch as dispatch
import fastpeft.methods.lora.op as ops
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels.autotune import KernelConfig, lora_candidates
from fastpeft.kernels.runtime import input_precision, rows_view
from fastpeft.kernels.reference import lora_linear_ref

# On a GPU the tuner could pick the library floor for tiny shapes: these tests are about the tiles.
pytestmark = pytest.mark.usefixtures("triton_tiles_only")

# (M, K, N, r): odd sizes, M in {0, 1, 5, 33, ...}, ranks on both the in-loop path
# (r <= 64) and the precomputed-xa epilogue path (r > 64).
SHAPES = [
    (0, 37, 45, 3),
    (1, 16, 16, 1),
    (5, 123, 123, 8),
    (33, 70, 19, 16),
    (17, 50, 61, 64),
    (9, 40, 30, 100),
    (3, 33, 20, 256),
]


def _make(M, K, N, r, dtype, bias=True):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    a = torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5
    bm = torch.randn(N, r, device=DEVICE, dtype=dtype) / r**0.5
    return x, w, b, a, bm


def _ref64(x, w, b, a, bm, s, x_lora=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return lora_linear_ref(d(x), d(w), d(b), d(a), d(bm), s, d(x_lora))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count launches of the Triton launcher: proof that the fused path ran."""
    calls = []
    real = lora_kernels.lora_linear_fwd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("xa") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._kernels, "lora_linear_fwd", spy)
    return calls


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(M, K, N, r, dtype, bias, kernel_calls):
    x, w, b, a, bm = _make(M, K, N, r, dtype, bias)
    y = ops.lora_linear(x, w, b, a, bm, 0.75, backend="triton")
    assert kernel_calls, "the Triton launcher did not run"
    assert y.shape == (M, N) and y.dtype == dtype
    if M == 0:
        return
    ref = _ref64(x, w, b, a, bm, 0.75)
    same = lora_linear_ref(x, w, b, a, bm, 0.75)
    assert_matches_ref(y, ref, same, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_every_output_element_written(dtype):
    """Poisoned output: a missed tile or mask bug leaves NaN behind."""
    x, w, b, a, bm = _make(37, 45, 77, 5, dtype)
    out = torch.full((37, 77), float("nan"), device=DEVICE, dtype=dtype)
    y = lora_kernels.lora_linear_fwd(x, w, b, a, bm, 2.0, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, _ref64(x, w, b, a, bm, 2.0)) < 5e-3


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_precomputed_shrink_path_poisoned(dtype):
    x, w, b, a, bm = _make(21, 40, 50, 7, dtype)
    xa = F.linear(x, a)
    out = torch.full((21, 50), float("nan"), device=DEVICE, dtype=dtype)
    y = lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.5, xa=xa, out=out)
    assert rel_err(y, _ref64(x, w, b, a, bm, 0.5)) < 5e-3


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_base_only_when_no_adapter(dtype):
    x, w, b, _, _ = _make(13, 29, 31, 1, dtype)
    y = lora_kernels.lora_linear_fwd(x, w, b, None, None, 1.0)
    assert_matches_ref(y, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_leading_batch_dims(dtype, kernel_calls):
    x, w, b, a, bm = _make(1, 24, 18, 4, dtype)
    x = torch.randn(2, 3, 5, 24, device=DEVICE, dtype=dtype)
    y = ops.lora_linear(x, w, b, a, bm, 1.5, backend="triton")
    assert y.shape == (2, 3, 5, 18) and kernel_calls
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 1.5), lora_linear_ref(x, w, b, a, bm, 1.5), dtype)


def _strided_inputs(dtype):
    base = torch.randn(6, 7, 2 * 24, device=DEVICE, dtype=dtype)
    return {
        "column_stride": base[:, :, ::2],  # stride 2 along K
        "transposed_3d": torch.randn(7, 6, 24, device=DEVICE, dtype=dtype).transpose(0, 1),
        "row_slice": torch.randn(40, 24, device=DEVICE, dtype=dtype)[::3],
        "permuted_4d": torch.randn(2, 3, 4, 24, device=DEVICE, dtype=dtype).permute(2, 0, 1, 3),
    }


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("kind", ["column_stride", "transposed_3d", "row_slice", "permuted_4d"])
def test_strided_input(kind, dtype, kernel_calls):
    x = _strided_inputs(dtype)[kind]
    assert not x.is_contiguous()
    _, w, b, a, bm = _make(1, 24, 19, 6, dtype)
    y = ops.lora_linear(x, w, b, a, bm, 0.5, backend="triton")
    assert kernel_calls
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.5), lora_linear_ref(x, w, b, a, bm, 0.5), dtype)


def test_rows_view_reads_in_place():
    """Inputs whose rows fit two strides are described, not copied."""
    for kind in ("column_stride", "transposed_3d", "row_slice"):
        x = _strided_inputs(torch.float32)[kind]
        xv, M, m_inner, s0, s1, sk = rows_view(x)
        assert xv.data_ptr() == x.data_ptr() and M == x.numel() // x.shape[-1]
        rows = torch.stack(
            [xv.as_strided((x.shape[-1],), (sk,), xv.storage_offset() + (m // m_inner) * s0 + (m % m_inner) * s1)
             for m in range(M)]
        )
        torch.testing.assert_close(rows, x.reshape(M, -1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_separate_lora_input(dtype, kernel_calls):
    """x_lora (dropout's output) feeds the LoRA branch only: the epilogue path."""
    x, w, b, a, bm = _make(11, 36, 28, 4, dtype)
    x_lora = x * (torch.rand_like(x) > 0.3) / 0.7
    y = ops.lora_linear(x, w, b, a, bm, 2.0, x_lora=x_lora, backend="triton")
    assert kernel_calls == [True]
    ref = _ref64(x, w, b, a, bm, 2.0, x_lora)
    assert_matches_ref(y, ref, lora_linear_ref(x, w, b, a, bm, 2.0, x_lora), dtype)


def _grads(fn, tensors):
    out = fn(*tensors)
    g = torch.randn_like(out)
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(5, 37, 29, 3), (33, 20, 48, 16), (4, 18, 22, 80)])
@pytest.mark.parametrize("separate_lora_input", [False, True])
def test_gradients_match_reference(M, K, N, r, dtype, separate_lora_input):
    x, w, b, a, bm = _make(M, K, N, r, dtype)
    xl = torch.randn_like(x) if separate_lora_input else None
    leaves = [t.requires_grad_() for t in (x, b, a, bm)] + ([xl.requires_grad_()] if xl is not None else [])
    out = ops.lora_linear(x, w, b, a, bm, 0.7, x_lora=xl, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, b64, a64, bm64 = leaves64[:4]
    xl64 = leaves64[4] if xl is not None else None
    ref = lora_linear_ref(x64, w.double(), b64, a64, bm64, 0.7, xl64)
    want = torch.autograd.grad(ref, leaves64, g.double())
    for name, gg, ww in zip(["x", "bias", "lora_A", "lora_B", "x_lora"], got, want):
        assert gg.dtype == dtype, name
        assert rel_err(gg, ww) <= (1e-5 if dtype == torch.float32 else 1e-2), name


def test_unfrozen_weight_gradient():
    x, w, b, a, bm = _make(6, 12, 10, 2, torch.float32)
    w.requires_grad_()
    g = torch.randn(6, 10)
    (got,) = torch.autograd.grad(ops.lora_linear(x, w, b, a, bm, 1.0, backend="triton"), [w], g)
    torch.testing.assert_close(got, g.t() @ x)


def test_torch_backend_does_not_launch_kernel(kernel_calls):
    x, w, b, a, bm = _make(5, 12, 10, 2, torch.float32)
    y = ops.lora_linear(x, w, b, a, bm, 1.0, backend="torch")
    assert not kernel_calls
    assert rel_err(y, _ref64(x, w, b, a, bm, 1.0)) < 1e-6


def test_fp32_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------ error paths


def test_wrong_last_dimension():
    x, w, b, a, bm = _make(4, 12, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="last dimension 12"):
        ops.lora_linear(x[:, :11], w, b, a, bm, 1.0)


def test_dtype_mismatch():
    x, w, b, a, bm = _make(4, 12, 10, 2, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        ops.lora_linear(x.half(), w, b, a, bm, 1.0)


def test_device_mismatch():
    x, w, b, a, bm = _make(4, 12, 10, 2, torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        ops.lora_linear(torch.empty(4, 12, device="meta"), w, b, a, bm, 1.0)


def test_adapter_shape_mismatch():
    x, w, b, a, bm = _make(4, 12, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        ops.lora_linear(x, w, b, a[:, :5], bm, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        ops.lora_linear(x, w, b, a, bm[:, :1], 1.0)


def test_unknown_backend():
    x, w, b, a, bm = _make(4, 12, 10, 2, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        ops.lora_linear(x, w, b, a, bm, 1.0, backend="cuda")


def test_forced_triton_without_gpu_or_interpreter(monkeypatch):
    # As on a machine where triton was imported without TRITON_INTERPRET=1.
    monkeypatch.setattr(dispatch._runtime, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_lean_inference_path_skips_the_dispatcher(kernel_calls, monkeypatch):
    """Without autograd or tracing, the op launches the kernel directly (decode speed);
    with autograd it goes through the custom op (and keeps the shrink for the backward);
    both give the same numbers."""
    x, w, b, a, bm = _make(5, 40, 24, 8, torch.float32)
    a.requires_grad_(True)
    op_calls = []
    real_op = ops._lora_linear_op
    monkeypatch.setattr(ops, "_lora_linear_op", lambda *args: op_calls.append(1) or real_op(*args))
    with torch.no_grad():
        lean = ops.lora_linear(x, w, b, a, bm, 0.5, backend="triton")
    assert not op_calls and len(kernel_calls) == 1
    tracked = ops.lora_linear(x, w, b, a, bm, 0.5, backend="triton")
    assert op_calls and len(kernel_calls) == 2 and tracked.requires_grad
    torch.testing.assert_close(lean, tracked.detach(), rtol=1e-5, atol=1e-5)


# Launch variants the GPU tuner can pick, forced here with interpreter-sized tiles.
SPLIT_K_CONFIGS = [
    KernelConfig(16, 32, 32, num_warps=1, num_stages=1, split_k=2),
    KernelConfig(16, 16, 16, num_warps=1, num_stages=1, split_k=5),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cfg", SPLIT_K_CONFIGS, ids=lambda c: f"split{c.split_k}")
@pytest.mark.parametrize("M,K,N,r", [(1, 100, 37, 8), (7, 77, 50, 16), (3, 40, 21, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_matches_reference(M, K, N, r, dtype, cfg, bias):
    x, w, b, a, bm = _make(M, K, N, r, dtype, bias)
    xa = F.linear(x, a) if r > lora_kernels.MAX_IN_LOOP_RANK else None
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)  # poison
    lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.5, xa=xa, config=cfg, out=y)
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.5), lora_linear_ref(x, w, b, a, bm, 0.5), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(33, 70, 19, 16), (5, 123, 45, 64)])
def test_precomputed_xa_variant_matches_reference(M, K, N, r, dtype):
    cfg = KernelConfig(16, 32, 32, num_warps=1, num_stages=1, precompute_xa=True)
    x, w, b, a, bm = _make(M, K, N, r, dtype)
    x = x.t().contiguous().t()  # strided rows: the precompute reads them in place
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    lora_kernels.lora_linear_fwd(x, w, b, a, bm, 1.5, config=cfg, out=y)
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 1.5), lora_linear_ref(x, w, b, a, bm, 1.5), dtype)


def test_tuner_search_space_covers_decode_and_prefill():
    decode = lora_candidates(1, 4096, True)
    prefill = lora_candidates(4096, 4096, True)
    assert any(c.split_k > 1 for c in decode) and not any(c.precompute_xa for c in decode)
    assert any(c.precompute_xa for c in prefill) and not any(c.split_k > 1 for c in prefill)
    assert not any(c.precompute_xa for c in lora_candidates(4096, 4096, False))


# The persistent TMA kernel (Hopper, large M), forced with interpreter-sized tiles. A
# descriptor needs 16-byte rows: K and N multiples of 8 (fp16) / 4 (fp32).
TMA_CONFIGS = [
    KernelConfig(16, 32, 32, num_warps=1, num_stages=1, tma=True),
    KernelConfig(16, 16, 16, num_warps=1, num_stages=1, tma=True, precompute_xa=True),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=["loop", "pre"])
@pytest.mark.parametrize("M,K,N,r", [(1, 16, 16, 1), (37, 72, 40, 5), (70, 48, 24, 16), (9, 40, 56, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_tma_kernel_matches_reference(M, K, N, r, dtype, cfg, bias, monkeypatch):
    calls = []
    real = lora_kernels.lora_tma.lora_linear_tma_launch
    monkeypatch.setattr(lora_kernels.lora_tma, "lora_linear_tma_launch", lambda **kw: calls.append(1) or real(**kw))
    x, w, b, a, bm = _make(M, K, N, r, dtype, bias)
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.5, config=cfg, out=y)
    assert calls, "the TMA launcher did not run"
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.5), lora_linear_ref(x, w, b, a, bm, 0.5), dtype)


def test_tma_kernel_batch_dims_and_base_only():
    cfg = TMA_CONFIGS[0]
    x, w, b, a, bm = _make(30, 64, 48, 8, torch.float32)
    x3 = x.reshape(5, 6, 64)
    y = lora_kernels.lora_linear_fwd(x3, w, b, a, bm, 2.0, config=cfg)
    assert_matches_ref(y.reshape(30, 48), _ref64(x, w, b, a, bm, 2.0), lora_linear_ref(x, w, b, a, bm, 2.0), torch.float32)
    base = lora_kernels.lora_linear_fwd(x, w, b, None, None, 1.0, config=cfg)
    assert rel_err(base, F.linear(x.double(), w.double(), b.double())) < 1e-6


def test_tma_kernel_refuses_unaligned_input():
    x, w, b, a, bm = _make(8, 30, 16, 4, torch.float16)  # 60-byte rows: no descriptor
    with pytest.raises(ValueError, match="TMA kernel needs"):
        lora_kernels.lora_linear_fwd(x, w, b, a, bm, 1.0, config=TMA_CONFIGS[0])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("lead,K,N,r", [((7,), 37, 29, 3), ((2, 3), 40, 24, 16), ((5,), 18, 22, 80)])
def test_input_gradient_runs_the_fused_kernel(lead, K, N, r, dtype, kernel_calls):
    """Without dropout, dx = g W + s (g B) A is one launch of the forward kernel over
    transposed views (W^T, B^T, A^T); it matches the float64 gradient."""
    x, w, b, a, bm = _make(math.prod(lead), K, N, r, dtype)
    x = x.reshape(*lead, K).requires_grad_()
    a.requires_grad_()
    out = ops.lora_linear(x, w, b, a, bm, 0.7, backend="triton")
    g = torch.randn_like(out)
    launches = len(kernel_calls)
    (dx,) = torch.autograd.grad(out, [x], g)
    assert len(kernel_calls) == launches + 1, "the backward did not launch the fused kernel"
    x64 = x.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, w.double(), b.double(), a.detach().double(), bm.double(), 0.7)
    (want,) = torch.autograd.grad(ref, [x64], g.double())
    assert dx.shape == x.shape and dx.dtype == dtype
    assert rel_err(dx, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
