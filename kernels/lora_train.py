"""Fused LoRA training kernels: dropout + shrink (forward) and the LoRA backward.

Math (PEFT layout, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, rows of ``x`` flattened
to ``(M, K)``, ``g = dL/dy`` of shape ``(M, N)``, dropout probability ``p``)::

    keep[m, k] = U(seed; k, m) >= p                   Philox, regenerated, never stored
    D(x)       = keep * x / (1 - p)                    (the identity when p = 0)
    S          = D(x) A^T                              (M, r)   forward, kept for backward
    y          = x W^T + b + s S B^T                   kernels/lora.py, xa = S
    dS         = s g B                                 (M, r)   \\ one read of g
    dB         = s g^T S                               (N, r)   /
    dX         = g W + keep * (dS A) / (1 - p)         (M, K)   one GEMM (lora_grad_dx.py, or the
                                                                forward kernel over W^T when p = 0)
    dA         = dS^T D(x)                             (r, K)   mask regenerated from the seed

The training step therefore keeps only ``x`` (which the base GEMM needs anyway), ``S``
and a one-element seed, never ``D(x)`` nor its mask (PEFT keeps ``x``, ``D(x)``, the
mask and ``x A^T``). ``U(seed; k, m)`` is defined once, in ``dropout.py`` (Philox):
the same for every kernel that reads element ``(m, k)``, whatever its tiling;
``dropout.dropout_mask`` materialises it (tests; the reference takes it as an explicit
mask).

Every dot accumulates in fp32; operands are rounded as ``tiles.lora_dot`` says (to the
input dtype, or kept in fp32 range for fp32 adapters on a 16-bit model). The reductions
over M (``dB``, ``dA``) and the K-split shrink accumulate across programs with fp32
atomics (order-dependent in the last bits, as split-K GEMMs are); the adapter gradients
are returned in the adapters' dtype.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .autotune import KernelConfig, m_bucket, pick
from .runtime import (
    cdiv,
    check_interpretable,
    input_precision,
    k_splits,
    lora_in_fp32,
    next_power_of_2,
    on_device,
    rows_view,
)
from .dropout import dropout_tile, keep_scale
from .tiles import lora_dot, row_offsets

__all__ = ["lora_dropout_shrink", "lora_grad_a", "lora_grad_shrink"]

# Under the interpreter: small tiles, and two splits so that the atomics run in tests.
_INTERPRETER = KernelConfig(16, 32, 32, 1, 1, 1, split_k=2)
_MAX_BLOCK_R = 64


@triton.jit
def _dropout_shrink_kernel(
    # pointers
    x_ptr, a_ptr, seed_ptr, s_ptr,
    # sizes
    M, K, R, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    # scalars
    p, keep_scale, K_PER_SPLIT,
    # meta
    DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``S[m, j] = sum_k D(x)[m, k] A[j, k]`` for one ``(BLOCK_M, BLOCK_R)`` tile and the
    K columns ``[pid_k * K_PER_SPLIT, ...)``: stored (one split) or atomically added to
    an fp32 ``S`` (``ATOMIC``). ``D(x)`` is formed in registers from the seed."""
    pid_m, pid_k, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_r = offs_m < M, offs_r < R
    row_off = row_offsets(offs_m, M_INNER, stride_xm0, stride_xm1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k
        mask_k = cols < k_end
        x = tl.load(x_ptr + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            x = dropout_tile(x, seed_ptr, offs_m, cols, p, keep_scale)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + cols[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = lora_dot(x, a, acc, x_ptr.dtype.element_ty, LORA_FP32, INPUT_PRECISION)
    s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    mask = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(s_ptrs, acc, mask=mask)
    else:
        tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_shrink_kernel(
    # pointers
    g_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    # sizes
    M, N, R,
    # strides
    stride_gm, stride_gn,
    stride_bn, stride_br,
    stride_sm, stride_sr,
    stride_dsm, stride_dsr,
    stride_dbn, stride_dbr,
    # scalars
    scaling, N_PER_SPLIT,
    # meta
    NEED_DB: tl.constexpr,
    DS_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One read of ``g`` for both ``dS = s g B`` and ``dB = s g^T S``.

    Program ``(m, n, r)`` walks the columns ``[n * N_PER_SPLIT, ...)`` of its ``BLOCK_M``
    rows of ``g`` in ``BLOCK_N`` chunks: each chunk ``g_c`` adds ``g_c B_c`` to the tile's
    ``dS`` (registers) and ``s g_c^T S_tile`` to ``dB``'s rows of that chunk (fp32
    atomics: every row tile contributes). ``dS`` is stored, or atomically added when
    several programs share its rows (``DS_ATOMIC``).
    """
    pid_m, pid_n, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m, mask_r = offs_m < M, offs_r < R
    offs_m64 = offs_m.to(tl.int64)
    dtype = g_ptr.dtype.element_ty
    if NEED_DB:
        s_tile = tl.load(s_ptr + offs_m64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    n_start = pid_n * N_PER_SPLIT
    n_end = tl.minimum(N, n_start + N_PER_SPLIT)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < n_end
        g = tl.load(g_ptr + offs_m64[:, None] * stride_gm + cols[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = lora_dot(g, b, ds, dtype, LORA_FP32, INPUT_PRECISION)
        if NEED_DB:
            db = lora_dot(tl.trans(g), s_tile, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), dtype,
                          LORA_FP32, INPUT_PRECISION)
            tl.atomic_add(db_ptr + cols[:, None] * stride_dbn + offs_r[None, :] * stride_dbr, db * scaling,
                          mask=mask_n[:, None] & mask_r[None, :])
    ds_ptrs = ds_ptr + offs_m64[:, None] * stride_dsm + offs_r[None, :] * stride_dsr
    if DS_ATOMIC:
        tl.atomic_add(ds_ptrs, ds * scaling, mask=mask_m[:, None] & mask_r[None, :])
    else:
        tl.store(ds_ptrs, ds * scaling, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _grad_a_kernel(
    # pointers
    ds_ptr, x_ptr, seed_ptr, da_ptr,
    # sizes
    M, K, R, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_dsm, stride_dsr,
    stride_dar, stride_dak,
    # scalars
    p, keep_scale, M_PER_SPLIT,
    # meta
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dA[j, k] += sum_m dS[m, j] D(x)[m, k]`` over the rows ``[pid_m * M_PER_SPLIT,
    ...)`` for one ``(BLOCK_R, BLOCK_K)`` tile, atomically added to an fp32 ``dA``;
    ``D(x)`` regenerated from the seed, ``dS`` (fp32) rounded as ``lora_dot`` says."""
    pid_k, pid_m, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k, mask_r = offs_k < K, offs_r < R
    m_start = pid_m * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < m_end
        row_off = row_offsets(rows, M_INNER, stride_xm0, stride_xm1)
        x = tl.load(x_ptr + row_off[:, None] + offs_k.to(tl.int64)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if DROPOUT:
            x = dropout_tile(x, seed_ptr, rows, offs_k, p, keep_scale)
        ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = lora_dot(tl.trans(ds), x, acc, x_ptr.dtype.element_ty, LORA_FP32, INPUT_PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak, acc,
                  mask=mask_r[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------- launch


def _block_r(R: int) -> int:
    return min(_MAX_BLOCK_R, max(16, next_power_of_2(R)))


def _reduce_candidates(n_tiles: int, reduce_len: int, dtype: torch.dtype) -> List[KernelConfig]:
    """Tiles for the skinny reductions: a split of the reduced dim so that ``n_tiles``
    (tiles of the kept dims) times the split fills the GPU, and the tiles' widths."""
    cands = []
    for bm, bn, bk, warps in ((64, 64, 64, 4), (128, 64, 64, 8), (64, 128, 128, 8), (32, 64, 128, 4)):
        for split in (1, 2, 4, 8, 16, 32):
            if split == 1 or (n_tiles * split <= 1024 and reduce_len >= split * 256):
                cands.append(KernelConfig(bm, bn, bk, 8, warps, 3 if dtype.itemsize < 4 else 2, split_k=split))
    return cands


def _seed_or_dummy(seed: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    return seed if seed is not None else ref


def lora_dropout_shrink(
    x: torch.Tensor, lora_A: torch.Tensor, p: float = 0.0, seed: Optional[torch.Tensor] = None,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """``S = D(x) A^T``, ``(M, r)``, in ``x``'s dtype, or fp32 when the branch keeps fp32
    range (``runtime.lora_in_fp32``, as ``lora.lora_shrink``). ``x``: ``(..., K)``, any
    strides (no copy); ``seed``: one-element int64 tensor, needed when ``p > 0``."""
    check_interpretable(x.dtype)
    rows = rows_view(x)
    (R, K), M = lora_A.shape, rows.M
    fp32 = lora_in_fp32(x.dtype, lora_A.dtype)
    s_dtype = torch.float32 if fp32 else x.dtype
    if M == 0 or R == 0 or K == 0:
        return torch.zeros((M, R), device=x.device, dtype=s_dtype)
    block_r = _block_r(R)

    def run(cfg: KernelConfig) -> torch.Tensor:
        k_per, split = k_splits(K, cfg.split_k, cfg.block_k)
        out = torch.zeros((M, R), device=x.device, dtype=torch.float32) if split > 1 else \
            torch.empty((M, R), device=x.device, dtype=s_dtype)
        _dropout_shrink_kernel[(cdiv(M, cfg.block_m), split, cdiv(R, block_r))](
            x_ptr=rows.x, a_ptr=lora_A, seed_ptr=_seed_or_dummy(seed, lora_A), s_ptr=out,
            M=M, K=K, R=R, M_INNER=rows.m_inner,
            stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
            stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_sm=out.stride(0), stride_sr=out.stride(1),
            p=float(p), keep_scale=keep_scale(p), K_PER_SPLIT=k_per,
            DROPOUT=p > 0, ATOMIC=split > 1,
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            LORA_FP32=fp32, INPUT_PRECISION=input_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out

    with on_device(x):
        key = ("lora_train.shrink", x.device.index, x.dtype, lora_A.dtype, input_precision(x.dtype), K, R, p > 0,
               m_bucket(M))
        cfg = config or pick(key, run, lambda: _reduce_candidates(cdiv(M, 64), K, x.dtype), fixed=_INTERPRETER)
        return run(cfg).to(s_dtype)


def lora_grad_shrink(
    g: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, need_db: bool = True,
    config: Optional[KernelConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dS, dB)`` from one read of ``g`` (``(M, N)``, any 2-D strides): ``dS = s g B``
    (fp32, ``(M, r)``) and ``dB = s g^T S`` (``(N, r)`` in ``B``'s dtype; None unless
    ``need_db``). ``xa``: the forward's ``S`` (``(M, r)``)."""
    check_interpretable(g.dtype)
    (M, N), R = g.shape, lora_B.shape[1]
    fp32 = lora_in_fp32(g.dtype, lora_B.dtype)
    if M == 0 or N == 0 or R == 0:
        db = torch.zeros_like(lora_B) if need_db else None
        return torch.zeros((M, R), device=g.device, dtype=torch.float32), db
    block_r = _block_r(R)

    def run(cfg: KernelConfig) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n_per, split = k_splits(N, cfg.split_k, cfg.block_n)
        ds = (torch.zeros if split > 1 else torch.empty)((M, R), device=g.device, dtype=torch.float32)
        db = torch.zeros((N, R), device=g.device, dtype=torch.float32) if need_db else ds
        _grad_shrink_kernel[(cdiv(M, cfg.block_m), split, cdiv(R, block_r))](
            g_ptr=g, b_ptr=lora_B, s_ptr=xa, ds_ptr=ds, db_ptr=db,
            M=M, N=N, R=R,
            stride_gm=g.stride(0), stride_gn=g.stride(1),
            stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
            stride_sm=xa.stride(0), stride_sr=xa.stride(1),
            stride_dsm=ds.stride(0), stride_dsr=ds.stride(1),
            stride_dbn=db.stride(0), stride_dbr=db.stride(1),
            scaling=float(scaling), N_PER_SPLIT=n_per,
            NEED_DB=need_db, DS_ATOMIC=split > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
            LORA_FP32=fp32, INPUT_PRECISION=input_precision(g.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return ds, (db.to(lora_B.dtype) if need_db else None)

    with on_device(g):
        key = ("lora_train.dsdb", g.device.index, g.dtype, lora_B.dtype, xa.dtype, input_precision(g.dtype), N, R,
               need_db, m_bucket(M))
        cfg = config or pick(key, run, lambda: _reduce_candidates(cdiv(M, 64), N, g.dtype), fixed=_INTERPRETER)
        return run(cfg)


def lora_grad_a(
    ds: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, p: float = 0.0, seed: Optional[torch.Tensor] = None,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """``dA = dS^T D(x)`` (``(r, K)`` in ``dtype``, the adapter's), ``D(x)`` regenerated
    from ``seed`` as the forward drew it. ``ds``: ``(M, r)`` fp32; ``x``: ``(..., K)``."""
    check_interpretable(x.dtype)
    rows = rows_view(x)
    (M, R), K = ds.shape, x.shape[-1]
    da = torch.zeros((R, K), device=x.device, dtype=torch.float32)
    if M == 0 or R == 0 or K == 0:
        return da.to(dtype)
    block_r = _block_r(R)

    def run(cfg: KernelConfig) -> torch.Tensor:
        m_per, split = k_splits(M, cfg.split_k, cfg.block_m)
        da.zero_()
        _grad_a_kernel[(cdiv(K, cfg.block_k), split, cdiv(R, block_r))](
            ds_ptr=ds, x_ptr=rows.x, seed_ptr=_seed_or_dummy(seed, ds), da_ptr=da,
            M=M, K=K, R=R, M_INNER=rows.m_inner,
            stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
            stride_dsm=ds.stride(0), stride_dsr=ds.stride(1),
            stride_dar=da.stride(0), stride_dak=da.stride(1),
            p=float(p), keep_scale=keep_scale(p), M_PER_SPLIT=m_per,
            DROPOUT=p > 0,
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            LORA_FP32=lora_in_fp32(x.dtype, dtype), INPUT_PRECISION=input_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return da

    with on_device(x):
        key = ("lora_train.da", x.device.index, x.dtype, dtype, input_precision(x.dtype), K, R, p > 0, m_bucket(M))
        cfg = config or pick(key, run, lambda: _reduce_candidates(cdiv(K, 64), M, x.dtype), fixed=_INTERPRETER)
        return run(cfg).to(dtype)
