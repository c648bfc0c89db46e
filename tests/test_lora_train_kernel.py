"""The fused LoRA training path: dropout+shrink forward, dS/dB, dX with the dropout mask
in the epilogue, dA with the mask regenerated from the seed (kernels/lora_train.py).

Gradients of x, A, B (and the bias and base weight when unfrozen) against the float64
reference given the same keep mask (materialised from the kernels' seed), fp32 and fp16
under the interpreter (bf16 on a GPU), odd shapes, mixed adapter dtypes; gradcheck on the
reference path; the Triton kernels proven to run.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, INTERPRETED, KERNEL_DTYPES, ON_GPU
from numerics import rel_err

import fastpeft.methods.lora.op as ops
from fastpeft.kernels import lora_train
from fastpeft.kernels.dropout import dropout_mask
from fastpeft.kernels.autotune import KernelConfig
from fastpeft.kernels.reference import lora_linear_dropout_ref, lora_linear_ref

pytestmark = pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="needs the Triton kernels")

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture
def train_launches(monkeypatch):
    """Names of the training kernels' launchers as the op calls them."""
    calls = []
    for module, name in ((ops._train_kernels, "lora_dropout_shrink"), (ops._train_kernels, "lora_grad_shrink"),
                         (ops._dx_kernels, "lora_grad_dx"), (ops._train_kernels, "lora_grad_a")):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def _tensors(M, K, N, r, dtype, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    a = (torch.randn(r, K, device=DEVICE) / K**0.5).to(adapter_dtype)
    bm = torch.randn(N, r, device=DEVICE, dtype=adapter_dtype)
    return x, w, b, a, bm


def _check_grads(x, w, b, a, bm, p, s=0.7, unfreeze_base=False):
    """Forward and every gradient of the Triton training path vs the float64 reference
    with the mask the kernels drew."""
    leaves = [x, a, bm] + ([w, b] if unfreeze_base else [])
    for t in leaves:
        t.requires_grad_()
    seed = ops.dropout_seed(x.device) if p > 0 else None
    y = ops.lora_linear_unchecked(x, w, b, a, bm, s, None, "triton", p, seed)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    keep = dropout_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).reshape(x.shape) if p > 0 \
        else torch.ones_like(x, dtype=torch.bool)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, a64, bm64 = leaves64[:3]
    w64, b64 = leaves64[3:] if unfreeze_base else (w.double(), b.double())
    ref = lora_linear_dropout_ref(x64, w64, b64, a64, bm64, s, keep, p) if p > 0 \
        else lora_linear_ref(x64, w64, b64, a64, bm64, s)
    want = torch.autograd.grad(ref, leaves64, g.double())
    tol = GRAD_TOL[x.dtype]
    assert rel_err(y, ref) <= tol
    for name, gg, ww, leaf in zip(["x", "lora_A", "lora_B", "weight", "bias"], got, want, leaves):
        assert gg.dtype == leaf.dtype, name
        assert rel_err(gg, ww) <= tol, name


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(5, 37, 29, 3), (33, 20, 48, 16), (4, 18, 22, 80)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grads_match_reference(M, K, N, r, dtype, p, train_launches):
    _check_grads(*_tensors(M, K, N, r, dtype), p)
    expected = {"lora_dropout_shrink", "lora_grad_shrink", "lora_grad_a"} | ({"lora_grad_dx"} if p > 0 else set())
    assert set(train_launches) == expected


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_adapters_on_half_model(p):
    """PEFT's default on a half model: fp32 adapters, grads in fp32, dx in fp16."""
    _check_grads(*_tensors(7, 45, 19, 4, torch.float16, torch.float32), p)


def test_unfrozen_base_and_strided_3d_input():
    x, w, b, a, bm = _tensors(12, 33, 21, 5, torch.float32)
    x3 = x.reshape(4, 3, 33).transpose(0, 1)  # rows through two strides, read in place
    _check_grads(x3, w, b, a, bm, 0.4, unfreeze_base=True)


def test_mask_from_seed_is_reproducible_and_has_rate_p():
    seed = ops.dropout_seed(torch.device(DEVICE))
    m1 = dropout_mask(seed, 64, 96, 0.3)
    assert torch.equal(m1, dropout_mask(seed, 64, 96, 0.3))
    assert not torch.equal(m1, dropout_mask(seed + 1, 64, 96, 0.3))
    assert abs(m1.float().mean().item() - 0.7) < 0.03  # 6144 draws: ~6 sigma
    torch.manual_seed(5)
    s1 = ops.dropout_seed(torch.device(DEVICE))
    torch.manual_seed(5)
    assert torch.equal(s1, ops.dropout_seed(torch.device(DEVICE)))  # torch's RNG decides it


def test_inference_with_dropout_seed_matches_training_forward():
    """A no-grad forward with dropout (the lean path) draws the same mask."""
    x, w, b, a, bm = _tensors(9, 30, 17, 6, torch.float32)
    seed = ops.dropout_seed(x.device)
    with torch.no_grad():
        lean = ops.lora_linear_unchecked(x, w, b, a, bm, 2.0, None, "triton", 0.5, seed)
    keep = dropout_mask(seed, 9, 30, 0.5)
    assert rel_err(lean, lora_linear_dropout_ref(x.double(), w.double(), b.double(), a.double(), bm.double(),
                                                 2.0, keep, 0.5)) <= 1e-5


def test_dropout_seed_needs_triton_and_excludes_x_lora():
    x, w, b, a, bm = _tensors(3, 8, 6, 2, torch.float32)
    seed = ops.dropout_seed(x.device)
    with pytest.raises(ValueError, match="Triton backend"):
        ops.lora_linear_unchecked(x, w, b, a, bm, 1.0, None, "torch", 0.5, seed)
    with pytest.raises(ValueError, match="x_lora"):
        ops.lora_linear_unchecked(x, w, b, a, bm, 1.0, x.clone(), "triton", 0.5, seed)


def test_explicit_x_lora_still_trains(train_launches):
    """The public x_lora= API: the branch's own input gets its gradient."""
    x, w, b, a, bm = _tensors(6, 20, 13, 3, torch.float32)
    xl = torch.randn_like(x)
    leaves = [t.requires_grad_() for t in (x, a, bm, xl)]
    y = ops.lora_linear(x, w, b, a, bm, 0.5, x_lora=xl, backend="triton")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = lora_linear_ref(l64[0], w.double(), b.double(), l64[1], l64[2], 0.5, l64[3])
    for gg, ww in zip(got, torch.autograd.grad(ref, l64, g.double())):
        assert rel_err(gg, ww) <= 1e-5
    assert "lora_grad_shrink" in train_launches and "lora_grad_a" in train_launches


def test_gradcheck_reference_path():
    x, w, b, a, bm = (t.double() for t in _tensors(4, 6, 5, 2, torch.float32))
    xl = torch.randn_like(x)
    args = [t.requires_grad_() for t in (x, w, b, a, bm, xl)]
    fn = lambda x, w, b, a, bm, xl: ops.lora_linear(x, w, b, a, bm, 0.8, x_lora=xl, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    fn0 = lambda x, w, b, a, bm: ops.lora_linear(x, w, b, a, bm, 0.8, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn0, args[:5])


@pytest.mark.parametrize("cfg", [KernelConfig(16, 16, 16, 1, 1, 1, split_k=1),
                                 KernelConfig(16, 32, 16, 1, 1, 1, split_k=3)],
                         ids=["nosplit", "split3"])
def test_reduction_kernels_with_and_without_splits(cfg):
    """The GPU tuner's variants (one program per reduced range, or atomics across
    three) give the same sums."""
    M, K, N, r, p = 37, 50, 35, 20, 0.2
    x, w, _, a, bm = _tensors(M, K, N, r, torch.float32)
    g = torch.randn(M, N, device=DEVICE)
    seed = ops.dropout_seed(x.device)
    keep = dropout_mask(seed, M, K, p).double()
    xd = x.double() * keep / (1 - p)
    xa = lora_train.lora_dropout_shrink(x, a, p, seed, config=cfg)
    assert rel_err(xa, xd @ a.double().t()) <= 1e-6
    ds, db = lora_train.lora_grad_shrink(g, bm, xa, 1.5, config=cfg)
    ds64 = 1.5 * g.double() @ bm.double()
    assert rel_err(ds, ds64) <= 1e-6 and rel_err(db, 1.5 * g.double().t() @ xa.double()) <= 1e-6
    assert rel_err(lora_train.lora_grad_a(ds, x, torch.float32, p, seed, config=cfg), ds64.t() @ xd) <= 1e-6


def test_empty_rows():
    x, w, b, a, bm = _tensors(0, 12, 7, 3, torch.float32)
    _check_grads(x, w, b, a, bm, 0.5)


def test_opcheck_forward_and_backward_ops(p=0.5):
    """Schemas, fake tensors (torch.compile's view of the ops) and the autograd
    registration of both custom ops agree with their real kernels."""
    x, w, b, a, bm = _tensors(5, 12, 7, 3, torch.float32)
    a.requires_grad_()
    bm.requires_grad_()
    seed = ops.dropout_seed(x.device) if p > 0 else None
    torch.library.opcheck(ops._lora_linear_op, (x, w, b, a, bm, 0.5, None, p, seed, True, True))
    xa = lora_train.lora_dropout_shrink(x, a.detach(), p, seed)
    g = torch.randn(5, 7, device=DEVICE)
    torch.library.opcheck(ops._lora_backward_op,
                          (g, x, w, a.detach(), bm.detach(), xa, None, seed, 0.5, p, True, False, True, True))
