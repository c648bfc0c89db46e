"""The LoRA tuner's newer variants: the library-GEMM floor, split-K past decode (tiled and
persistent TMA) and TMA tiles from one 128-row tile up; each against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES
from numerics import assert_matches_ref
from test_lora_kernel import _make, _ref64

from fastpeft.kernels import autotune
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels.autotune import LIBRARY_GEMM, KernelConfig, lora_candidates, lora_variants
from fastpeft.kernels.reference import lora_linear_ref
from fastpeft.kernels.runtime import k_splits


@pytest.fixture
def no_tiles(monkeypatch):
    """The library variant must not launch the tiled or TMA kernels: fail if it does."""
    def refuse(*args, **kwargs):
        raise AssertionError("the library-GEMM variant launched a Triton GEMM")

    monkeypatch.setattr(lora_kernels, "_launch", refuse)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("M,K,N,r", [(1, 16, 16, 1), (5, 123, 45, 8), (33, 70, 19, 100)])
@pytest.mark.parametrize("bias", [True, False])
def test_library_floor_matches_reference(M, K, N, r, dtype, bias, no_tiles):
    x, w, b, a, bm = _make(M, K, N, r, dtype, bias)
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.75, config=LIBRARY_GEMM, out=y)
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.75), lora_linear_ref(x, w, b, a, bm, 0.75), dtype)


def test_library_floor_with_precomputed_xa_strided_rows_and_base_only(no_tiles):
    x, w, b, a, bm = _make(24, 40, 28, 6, torch.float32)
    xl = torch.randn_like(x)  # the dropout case: the branch's input differs from x
    xa = xl @ a.t()
    y = lora_kernels.lora_linear_fwd(x, w, b, a, bm, 2.0, xa=xa, config=LIBRARY_GEMM)
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 2.0, xl), lora_linear_ref(x, w, b, a, bm, 2.0, xl), torch.float32)
    x3 = x.reshape(4, 6, 40).transpose(0, 1)  # rows that need two strides
    y3 = lora_kernels.lora_linear_fwd(x3, w, b, a, bm, 2.0, config=LIBRARY_GEMM)
    x3r = x3.reshape(24, 40)
    assert_matches_ref(y3.reshape(24, 28), _ref64(x3r, w, b, a, bm, 2.0), lora_linear_ref(x3r, w, b, a, bm, 2.0),
                       torch.float32)
    base = lora_kernels.lora_linear_fwd(x, w, None, None, None, 1.0, config=LIBRARY_GEMM)
    assert_matches_ref(base, _ref64(x, w, None, a, bm, 0.0), x @ w.t(), torch.float32)


def test_library_floor_keeps_fp32_branch_of_fp32_adapters(no_tiles):
    """fp32 adapters on an fp16 base: ``x A^T`` past fp16's range stays finite (fp32 branch)."""
    x, w, b, a, bm = _make(8, 32, 16, 4, torch.float16)
    a = a.float() * 3e4  # |x A^T| > 65504: an fp16 branch would overflow
    bm = bm.float() / 3e4
    y = lora_kernels.lora_linear_fwd(x, w, b, a, bm, 1.0, config=LIBRARY_GEMM)
    ref = _ref64(x, w, b, a, bm, 1.0)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() < 2e-3


def test_tuner_offers_the_library_floor_and_keeps_it_when_fastest(monkeypatch):
    cands = lora_variants(16, 64, True, False, torch.float32, 48, 0)
    assert cands[-1] is LIBRARY_GEMM and all(isinstance(c, KernelConfig) for c in cands[:-1])
    timed = []

    def fake_time(run, cand):  # the floor wins; nothing is launched while "timing"
        timed.append(cand)
        return 0.5 if cand is LIBRARY_GEMM else 1.0

    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(autotune, "interpreter_active", lambda: False)
    monkeypatch.setattr(autotune, "time_variant", fake_time)
    monkeypatch.setenv("FASTPEFT_CACHE", "off")
    used = []
    real = lora_kernels._library_gemm
    monkeypatch.setattr(lora_kernels, "_library_gemm", lambda *a: used.append(1) or real(*a))
    x, w, b, a, bm = _make(16, 64, 48, 4, torch.float32)
    y = lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.5)
    assert LIBRARY_GEMM in timed and len(timed) == len(cands) and used == [1]
    assert list(autotune.TUNED.values()) == [LIBRARY_GEMM]
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.5), lora_linear_ref(x, w, b, a, bm, 0.5), torch.float32)


# Interpreter-sized split-K configs past decode: K = 96 gives 3 (block_k 32) or 2 splits.
SPLIT_CONFIGS = {
    "tma-loop-k3": KernelConfig(16, 32, 32, num_warps=1, num_stages=1, tma=True, split_k=3),
    "tma-pre-k2": KernelConfig(16, 16, 16, num_warps=1, num_stages=1, tma=True, split_k=2, precompute_xa=True),
    "tiles-k2": KernelConfig(32, 32, 32, num_warps=1, num_stages=1, split_k=2),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("name", list(SPLIT_CONFIGS))
@pytest.mark.parametrize("M,K,N,r,bias", [(70, 96, 40, 5, True), (131, 96, 24, 16, False)])
def test_split_k_past_decode_matches_reference(M, K, N, r, bias, dtype, name, monkeypatch):
    cfg = SPLIT_CONFIGS[name]
    reduced = []
    real_reduce = lora_kernels._reduce_splits
    monkeypatch.setattr(lora_kernels, "_reduce_splits", lambda p, b, y: reduced.append(p.shape) or real_reduce(p, b, y))
    tma_calls = []
    real_tma = lora_kernels.lora_tma.lora_linear_tma_launch
    monkeypatch.setattr(lora_kernels.lora_tma, "lora_linear_tma_launch",
                        lambda **kw: tma_calls.append(kw["y"].shape) or real_tma(**kw))
    x, w, b, a, bm = _make(M, K, N, r, dtype, bias)
    y = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    lora_kernels.lora_linear_fwd(x, w, b, a, bm, 0.5, config=cfg, out=y)
    splits = k_splits(K, cfg.split_k, cfg.block_k)[1]
    assert splits > 1 and reduced == [(splits, M, N)], "the partial sums were not reduced"
    assert tma_calls == ([(splits, M, N)] if cfg.tma else [])
    assert_matches_ref(y, _ref64(x, w, b, a, bm, 0.5), lora_linear_ref(x, w, b, a, bm, 0.5), dtype)


def test_tma_tiles_from_one_row_tile_and_split_k_when_sms_idle():
    at = lambda m, n=4096: lora_candidates(m, 4096, True, tma_ok=True, n=n, programs=132)  # noqa: E731
    assert not any(c.tma for c in at(autotune.TMA_MIN_M - 1))
    assert any(c.tma and c.block_m == 128 for c in at(autotune.TMA_MIN_M))
    # 4096 / 128 = 32 tiles of 128x128 at M = 128: fewer than the SMs, so split-K (<= 2x SMs).
    split = [c for c in at(128) if c.tma and c.split_k > 1]
    assert split and all(c.block_n == 128 for c in split)
    assert all(-(-4096 // c.block_n) * c.split_k <= 264 for c in split)
    assert any(not c.tma and c.split_k > 1 for c in at(128))
    # Enough tiles to fill the GPU: no split-K; without the GPU's size: none past decode.
    assert not any(c.split_k > 1 for c in at(4096))
    assert not any(c.split_k > 1 for c in lora_candidates(128, 4096, True, tma_ok=True))
    # A K too short for two 512-column chunks is never split.
    assert not any(c.split_k > 1 for c in lora_candidates(128, 512, True, tma_ok=True, n=4096, programs=132))
