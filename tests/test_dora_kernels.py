"""DoRA's kernels against the float64 reference: the row-norm kernel, the column-scale
epilogue of the fused LoRA kernel (every variant: in-loop shrink, precomputed ``xa``,
split-K) and the per-row scale of the mixed-adapter kernel; the layer's cache."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, KERNEL_DTYPES
from numerics import TOL, assert_matches_ref, rel_err

from fastpeft.kernels import dora as dora_kernels
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels import multi_lora as multi_kernels
from fastpeft.kernels.autotune import LIBRARY_GEMM, KernelConfig
from fastpeft.kernels.multi_lora_meta import MultiLoraLaunch
from fastpeft.kernels.reference import dora_scaled_ref, dora_weight_norm_ref, multi_lora_linear_ref
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.methods.lora.multi_op import build_meta


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("N,K,r,transposed", [(37, 45, 5, False), (5, 123, 20, True), (16, 16, 1, False)])
def test_row_norm_kernel(dtype, N, K, r, transposed):
    W = _t(K, N, dtype=dtype).t() if transposed else _t(N, K, dtype=dtype)
    A, B = _t(r, K, dtype=dtype), _t(N, r, dtype=dtype)
    out = dora_kernels.dora_weight_norm(W, A, B, 0.7)
    assert out.dtype == torch.float32 and out.shape == (N,)
    ref = dora_weight_norm_ref(*_f64(W, A, B), 0.7)
    # fp32 math on the given values: as exact as fp32 summation, whatever the input dtype.
    assert rel_err(out, ref) <= 1e-6


def test_row_norm_kernel_empty_rank_and_rows():
    W = _t(7, 9)
    assert torch.allclose(dora_kernels.dora_weight_norm(W, _t(0, 9), _t(7, 0), 2.0), W.norm(dim=1), rtol=1e-6)
    assert dora_kernels.dora_weight_norm(_t(0, 9), _t(3, 9), _t(0, 3), 1.0).shape == (0,)


CONFIGS = {
    "in-loop": (None, False),
    "xa": (None, True),
    "split-k": (KernelConfig(16, 32, 32, 8, 1, 1, split_k=2), False),
    "tma": (KernelConfig(16, 32, 32, num_warps=1, num_stages=1, tma=True), False),
    "tma-xa": (KernelConfig(16, 16, 16, num_warps=1, num_stages=1, tma=True, precompute_xa=True), False),
    "tma-split-k": (KernelConfig(16, 32, 32, num_warps=1, num_stages=1, tma=True, split_k=2), False),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("variant,has_bias", [
    ("in-loop", True), ("in-loop", False), ("xa", True), ("split-k", True), ("tma", True), ("tma-xa", False),
    ("tma-split-k", True),
])
def test_fused_epilogue_scales_columns(dtype, variant, has_bias, monkeypatch):
    config, pre_xa = CONFIGS[variant]
    # TMA needs 16-byte aligned rows: K and N multiples of 8 (fp16) / 4 (fp32)
    M, N, K, r = (5, 40, 96, 6) if variant.startswith("tma") else (5, 37, 123 if variant != "split-k" else 96, 6)
    tma_calls = []
    real_tma = lora_kernels.lora_tma.lora_linear_tma_launch
    monkeypatch.setattr(lora_kernels.lora_tma, "lora_linear_tma_launch",
                        lambda **kw: tma_calls.append(kw["mag"] is not None) or real_tma(**kw))
    x = _t(M, K, dtype=dtype)
    W, A, B = _t(N, K, dtype=dtype) * 0.1, _t(r, K, dtype=dtype) * 0.1, _t(N, r, dtype=dtype) * 0.1
    b = _t(N, dtype=dtype) if has_bias else None
    c = torch.rand(N, device=DEVICE) + 0.5
    xa = lora_kernels.lora_shrink(x, A) if pre_xa else None
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)  # poison: every element written
    y = lora_kernels.lora_linear_fwd(x, W, b, A, B, 0.5, xa=xa, config=config, out=out, mag=c)
    ref = dora_scaled_ref(*_f64(x, W, b, A, B), 0.5, c.double())
    same = dora_scaled_ref(x, W, b, A, B, 0.5, c)
    assert_matches_ref(y, ref, same, dtype)
    assert tma_calls == ([True] if variant.startswith("tma") else [])
    with pytest.raises(ValueError, match="no DoRA epilogue"):
        lora_kernels.lora_linear_fwd(x, W, b, A, B, 0.5, config=LIBRARY_GEMM, mag=c)
    # the scale really applied: without it the output differs
    plain = lora_kernels.lora_linear_fwd(x, W, b, A, B, 0.5, xa=xa, config=config)
    assert rel_err(plain, ref) > 10 * rel_err(y, ref)


@pytest.mark.parametrize("dtype,fuse,gather", [
    (torch.float32, True, True), (torch.float32, True, False), (torch.float32, False, True),
    (torch.float32, False, False), (torch.float16, True, True), (torch.float16, False, False),
    pytest.param(torch.bfloat16, False, True, marks=KERNEL_DTYPES[2].marks),
])
def test_mixed_kernel_scales_each_row_by_its_slot(dtype, fuse, gather):
    S, N, K, R = 3, 37, 45, 8
    W, b = _t(N, K, dtype=dtype), _t(N, dtype=dtype)
    A, B = _t(S, R, K, dtype=dtype), _t(S, N, R, dtype=dtype)
    ranks = torch.tensor([5, 8, 3], dtype=torch.int32, device=DEVICE)
    scalings = torch.tensor([0.5, 1.0, 2.0], device=DEVICE)
    mag = torch.rand(S, N, device=DEVICE) + 0.5
    mag[1] = 1.0  # a LoRA slot among DoRA ones
    row_slot = torch.tensor([0, -1, 2, 1, 0, 2, -1], dtype=torch.int32, device=DEVICE)
    x = _t(7, K, dtype=dtype)
    out = torch.full((7, N), float("nan"), device=DEVICE, dtype=dtype)
    y = multi_kernels.multi_lora_linear_fwd(
        x, W, b, A, B, ranks, scalings, build_meta(row_slot, S), launch=MultiLoraLaunch(fuse_base=fuse, gather=gather),
        out=out, mag=mag,
    )
    for m, slot in enumerate(row_slot.tolist()):
        if slot < 0:
            ref = F.linear(*_f64(x[m:m + 1], W, b))
        else:
            r = int(ranks[slot])
            ref = dora_scaled_ref(*_f64(x[m:m + 1], W, b, A[slot, :r], B[slot, :, :r]), float(scalings[slot]),
                                  mag[slot].double())
        assert rel_err(y[m:m + 1], ref) <= TOL[dtype], (m, slot)
    if not fuse:  # base rows keep cuBLAS's output bit for bit
        assert torch.equal(y[1], F.linear(x, W, b)[1])
    ref_all = multi_lora_linear_ref(*_f64(x, W, b, A, B), ranks, scalings.double(), row_slot, mag.double())
    assert rel_err(y, ref_all) <= TOL[dtype]


@pytest.fixture
def norm_launches(monkeypatch):
    from fastpeft.methods.lora import dora as dora_op

    calls = []
    real = dora_op._dora_kernels.dora_weight_norm

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(dora_op._dora_kernels, "dora_weight_norm", spy)
    return calls


def _dora_layer(N=37, K=45, r=4, dtype=torch.float32):
    base = torch.nn.Linear(K, N, device=DEVICE, dtype=dtype)
    layer = FastLoRALinear.from_linear(base, r, 8, adapter_name="d", init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.adapters["d"].lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(N, device=DEVICE))
    return layer.eval()


def _layer_ref(layer, x):
    a = layer.adapters["d"]
    from fastpeft.kernels.reference import dora_linear_ref

    return dora_linear_ref(*_f64(x, layer.weight, layer.bias, a.lora_A, a.lora_B), a.scaling,
                           a.lora_magnitude_vector.double())


def test_eval_cache_follows_weight_adapter_and_magnitude(norm_launches):
    layer = _dora_layer()
    x = _t(3, 45)
    with torch.no_grad():
        y = layer(x)
        n0 = len(norm_launches)
        assert n0 >= 1, "the row-norm kernel did not run"
        assert rel_err(layer(x), _layer_ref(layer, x)) <= 1e-5
        assert len(norm_launches) == n0, "eval mode recomputed a kept norm"
        for change in (lambda a: layer.weight.mul_(1.1), lambda a: a.lora_A.add_(0.1),
                       lambda a: a.lora_B.mul_(0.5), lambda a: a.lora_magnitude_vector.mul_(1.3)):
            change(layer.adapters["d"])
            out = layer(x)
            assert rel_err(out, _layer_ref(layer, x)) <= 1e-5
            assert not torch.allclose(out, y)
            y = out
    assert len(norm_launches) == n0 + 3  # W, A, B change the norm; m changes only the scale
    layer.train()
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(norm_launches) == n0 + 5  # training never keeps the norm


def test_delete_adapter_drops_its_cache():
    layer = _dora_layer()
    with torch.no_grad():
        layer(_t(2, 45))
    assert "d" in layer._dora_norm_cache and "d" in layer._dora_scale_cache
    layer.delete_adapter("d")
    assert "d" not in layer._dora_norm_cache and "d" not in layer._dora_scale_cache
