"""Fused LoRA linear forward: base GEMM plus low-rank update in one pass over ``y``.

Math (PEFT layout, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``)::

    y = x W^T + b + s * (x_l A^T) B^T

where ``x_l`` is the LoRA branch's input (``x`` itself, or ``dropout(x)`` in training).

Two ways of getting ``xa = x_l A^T`` into the output tile (on a GPU the tuner times
both, with split-K variants at decode, and keeps the fastest per shape and M bucket):

* ``SHRINK_IN_LOOP``: ``xa`` is accumulated in the same K loop as ``x W^T`` (one launch,
  the x tile is loaded once for both). Best at small M, where the extra
  ``BLOCK_R / BLOCK_N`` tensor-core work per tile is cheap and one launch matters.
* epilogue only: ``xa`` is precomputed (an ``(M, r)`` tensor, tiny next to ``y``) and
  the kernel adds ``s * xa B^T`` in its epilogue. Best at large M (the shrink is not
  repeated in every N tile) and required when the LoRA input differs from ``x``
  (dropout) or the rank is too large for a register-resident ``xa``.

The tuner also times the persistent TMA kernel (:mod:`.lora_tma`, Hopper, ``M >= 128``),
split-K wherever the output tiles leave SMs idle, and the library-GEMM floor
(:data:`autotune.LIBRARY_GEMM`: cuBLAS ``x W^T + b``, then ``y += s (x A^T) B^T`` in
place), so it never keeps a variant slower than the library.

Rows of ``x`` are addressed through two strides (:class:`runtime.Rows`) so that a 3-D
input whose leading dims cannot be flattened without a copy (e.g. a transposed
``(T, B, K)`` view) is read in place.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import lora_tma
from .lora_library import library_lora
from .autotune import INTERPRETER_CONFIG, TMA_MIN_M, KernelConfig, LibraryGemm, Variant, lora_variants, m_bucket, pick
from .runtime import (
    Rows,
    as_2d,
    cdiv,
    check_interpretable,
    input_precision,
    interpreter_active,
    k_splits,
    lora_in_fp32,
    next_power_of_2,
    on_device,
    output_for,
    rows_view,
    sm_count,
)
from .tiles import (
    add_bias,
    gemm_k_loop,
    gemm_shrink_k_loop,
    lora_expand_from_memory,
    lora_expand_resident,
    row_offsets,
    tile_offsets,
)

__all__ = ["MAX_IN_LOOP_RANK", "lora_linear_fwd", "lora_shrink"]

# Largest padded rank kept in registers by the in-loop shrink; larger ranks use the
# precomputed-xa epilogue, which walks R in chunks of _EPILOGUE_BLOCK_R.
MAX_IN_LOOP_RANK = 64
_EPILOGUE_BLOCK_R = 32
# A modest tile that fits every dtype: the plain-GEMM launch of ``_shrink``.
_SHRINK_CONFIG = KernelConfig(64, 64, 64, 8, 4, 3)
_REDUCE_BLOCK_M, _REDUCE_BLOCK_N = 16, 128


# Over 60 lines: its grouped argument list (pointers, sizes, strides, constexprs) is a third of it.
@triton.jit
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr,
    # sizes
    M, N, K, R, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    stride_ym, stride_yn,
    stride_ps,
    # scalars
    scaling, K_PER_SPLIT,
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    SHRINK_IN_LOOP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x W^T + b + s * xa B^T``.

    ``acc = sum_k x[m, k] W[n, k]`` over the K loop (fp32). With ``SHRINK_IN_LOOP`` the
    same loop also accumulates ``xa[m, j] = sum_k x[m, k] A[j, k]`` for ``j < BLOCK_R``
    (``BLOCK_R >= R``); otherwise ``xa`` is read from ``xa_ptr`` in ``BLOCK_R`` chunks.
    Epilogue: ``acc += xa (s B)^T``, ``acc += b``, store in ``y``'s dtype. The branch's
    dots round their operands to the input dtype, as an unfused low-precision LoRA branch
    would, or keep fp32 range with ``LORA_FP32`` (see ``tiles.lora_dot``).

    Split-K (``SPLIT_K > 1``, small M): program ``(tile, k)`` covers K columns
    ``[k * K_PER_SPLIT, (k + 1) * K_PER_SPLIT)`` and writes its fp32 partial sum (no bias)
    to slice ``k`` of ``y_ptr``, then an fp32 ``(SPLIT_K, M, N)`` buffer; the LoRA update
    is linear in ``x``, so each split adds its share of it (in-loop shrink: its partial
    ``xa``; precomputed ``xa``: split 0 adds all of it). ``_splitk_reduce_kernel`` sums
    the slices and adds the bias.
    """
    pid = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)
    row_off = row_offsets(offs_m64, M_INNER, stride_xm0, stride_xm1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHRINK_IN_LOOP:
        acc, xa = gemm_shrink_k_loop(
            acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, a_ptr, R, k_start, k_end,
            stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, BLOCK_K, BLOCK_R, LORA_FP32, INPUT_PRECISION,
        )
    else:
        acc = gemm_k_loop(
            acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, k_start, k_end,
            stride_xk, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION,
        )

    if HAS_LORA:
        if SHRINK_IN_LOOP:
            acc = lora_expand_resident(
                acc, xa, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, scaling, x_ptr.dtype.element_ty,
                BLOCK_R, LORA_FP32, INPUT_PRECISION,
            )
        elif pid_k == 0:
            acc = lora_expand_from_memory(
                acc, xa_ptr, b_ptr, offs_m64, offs_n, mask_m, mask_n, R,
                stride_xam, stride_xar, stride_bn, stride_br, scaling, x_ptr.dtype.element_ty,
                BLOCK_R, LORA_FP32, INPUT_PRECISION,
            )

    y_ptrs = y_ptr + pid_k * stride_ps + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, offs_n, mask_n)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(
    # pointers
    p_ptr, bias_ptr, y_ptr,
    # sizes
    M, N,
    # strides
    stride_ps, stride_pm, stride_pn,
    stride_ym, stride_yn,
    # meta
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y = sum_k partial[k] + b``: the split-K partial sums (fp32) to ``y``'s dtype."""
    offs_m = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(SPLIT_K):
        acc += tl.load(p_ptr + k * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, offs_n < N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    xa: Optional[torch.Tensor] = None,
    config: Optional[Variant] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel: ``y = x W^T + b + s * (x A^T) B^T`` (or ``s * xa B^T``).

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; both None for the base GEMM alone.
        scaling: ``s``.
        xa: optional precomputed ``x_l A^T`` of shape ``(M, r)`` (M = rows of ``x``), as
            :func:`lora_shrink` computes it: selects the epilogue-only variant (needed
            for dropout, any rank).
        config: force a variant (a tile config, or ``LIBRARY_GEMM``; benchmarks);
            default: tuned per shape.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`runtime.check_interpretable`).
    """
    check_interpretable(x.dtype)
    N, K = weight.shape
    y = output_for(x, N, out)
    rows = rows_view(x)
    M = rows.M
    if M == 0 or N == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    y2 = y.view(M, N)
    with on_device(x):
        if K == 0:  # empty sums: y = b (x A^T is zero too)
            if bias is None:
                y2.zero_()
            else:
                y2.copy_(bias.expand(M, N))
            return y
        if lora_A is not None and xa is None and lora_A.shape[0] > MAX_IN_LOOP_RANK:
            xa = _shrink(rows, lora_A)

        def run(variant: Variant) -> None:
            if isinstance(variant, LibraryGemm):
                _library_gemm(rows, weight, bias, lora_A, lora_B, xa, scaling, y2)
            else:
                _launch(variant, rows, weight, bias, lora_A, lora_B, xa, scaling, y2)

        if config is None:
            config = _tuned_config(x, rows, weight, bias, lora_A, lora_B, xa, y2, run)
        run(config)
    return y


def _tuned_config(x, rows: Rows, weight, bias, lora_A, lora_B, xa, y2, run) -> Variant:
    """The tuner's pick for this call (keyed by shapes, dtypes, precision, M bucket)."""
    M, (N, K) = rows.M, weight.shape
    r = 0 if lora_A is None else lora_A.shape[0]
    in_loop = lora_A is not None and xa is None
    tma_ok = M >= TMA_MIN_M and lora_tma.tma_fits(rows, weight, lora_A, y2)
    # The adapters' dtype changes the kernel's shared memory: part of the key.
    a_dtype = None if lora_A is None else (lora_A.dtype, lora_B.dtype)
    key = ("lora", x.device.index, x.dtype, input_precision(x.dtype), a_dtype, N, K, r, xa is None, bias is None,
           tma_ok, m_bucket(M))
    return pick(key, run, lambda: lora_variants(M, K, in_loop, tma_ok, x.dtype, N, _programs(x)))


def _programs(x: torch.Tensor) -> int:
    """SMs that split-K tries to fill (0 off a GPU: no split-K beyond decode)."""
    return sm_count(x.device) if x.is_cuda else 0


def _library_gemm(
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y2: torch.Tensor,
) -> None:
    """The library-GEMM variant into ``y2`` (:func:`lora_library.library_lora`), with
    ``xa = x A^T`` from :func:`lora_shrink` unless given."""
    M, K = rows.M, weight.shape[1]
    x2 = as_2d(rows, K)
    if x2 is None:  # rows with two strides: the library needs one
        x2 = rows.x.reshape(M, K)
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    if has_lora and xa is None:
        xa = lora_shrink(x2, lora_A)
    library_lora(x2=x2, weight=weight, bias=bias, lora_B=lora_B if has_lora else None, xa=xa, scaling=scaling, y=y2)


def _launch(
    cfg: KernelConfig,
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y: torch.Tensor,
) -> None:
    """One launch of ``cfg``'s variant, written into ``y`` (``(M, N)``)."""
    if lora_A is not None and lora_A.shape[0] == 0:
        lora_A = lora_B = None  # rank 0: the base GEMM alone
    if lora_A is not None and xa is None and cfg.precompute_xa:
        xa = _shrink(rows, lora_A)
    in_loop = lora_A is not None and xa is None
    R = lora_A.shape[0] if lora_A is not None else 0
    block_r = max(16, next_power_of_2(R)) if in_loop else _EPILOGUE_BLOCK_R
    lora_fp32 = lora_A is not None and lora_in_fp32(rows.x.dtype, lora_A.dtype)
    if cfg.tma:
        _launch_tma(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32)
    else:
        _launch_tiles(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32)


def _launch_tma(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32) -> None:
    """:func:`_launch` on the persistent TMA kernel (its inputs must be descriptor-ready);
    split-K partial sums reduced into ``y`` after."""
    M, (N, K) = rows.M, weight.shape
    x2 = as_2d(rows, K)
    if not lora_tma.tma_eligible(x2, weight, lora_A, weight.shape[0], lora_A is not None and xa is None):
        raise ValueError(
            "the TMA kernel needs x and the weights with unit last stride and 16-byte aligned "
            "rows (K and N multiples of 16 bytes); use a config with tma=False for this call"
        )
    k_per_split, split = k_splits(K, cfg.split_k, cfg.block_k)
    out = y if split == 1 else torch.empty((split, M, N), device=y.device, dtype=torch.float32)
    lora_tma.lora_linear_tma_launch(
        x2=x2, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, xa=xa, scaling=scaling, y=out,
        cfg=cfg, block_r=block_r, lora_fp32=lora_fp32, input_precision=input_precision(rows.x.dtype),
        k_per_split=k_per_split,
    )
    if split > 1:
        _reduce_splits(out, bias, y)


def _launch_tiles(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32) -> None:
    """:func:`_launch` on the tiled kernel; split-K partial sums reduced into ``y`` after."""
    M, (N, K) = rows.M, weight.shape
    # Unused pointers still need a tensor; ``weight`` is a safe placeholder.
    a = lora_A if lora_A is not None else weight
    b = lora_B if lora_A is not None else weight
    xa_t = xa if xa is not None else weight
    k_per_split, split = k_splits(K, cfg.split_k, cfg.block_k)
    # Split-K programs write fp32 partial sums, reduced into ``y`` below.
    out = y if split == 1 else torch.empty((split, M, N), device=y.device, dtype=torch.float32)
    stride_ps, stride_ym, stride_yn = (0, y.stride(0), y.stride(1)) if split == 1 else out.stride()
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n), split)
    _lora_linear_fwd_kernel[grid](
        x_ptr=rows.x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, a_ptr=a, b_ptr=b,
        xa_ptr=xa_t, y_ptr=out,
        M=M, N=N, K=K, R=lora_A.shape[0] if lora_A is not None else 0, M_INNER=rows.m_inner,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_bn=b.stride(0), stride_br=b.stride(1),
        stride_xam=xa_t.stride(0), stride_xar=xa_t.stride(1),
        stride_ym=stride_ym, stride_yn=stride_yn, stride_ps=stride_ps,
        scaling=float(scaling), K_PER_SPLIT=k_per_split,
        HAS_BIAS=bias is not None,
        HAS_LORA=lora_A is not None,
        SHRINK_IN_LOOP=lora_A is not None and xa is None,
        SPLIT_K=split,
        BLOCK_R=block_r,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        **cfg.meta,
    )
    if split > 1:
        _reduce_splits(out, bias, y)


def lora_shrink(x2: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T`` (``x2``: ``(M, K)``), the precomputed shrink the epilogue reads: in
    ``x``'s dtype, or in fp32 (``x`` upcast, as PEFT's fp32 branch upcasts it) when
    :func:`runtime.lora_in_fp32`."""
    dtype = torch.float32 if lora_in_fp32(x2.dtype, lora_A.dtype) else x2.dtype
    return torch.nn.functional.linear(x2.to(dtype), lora_A.to(dtype))


def _shrink(rows: Rows, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T``, ``(M, r)`` as :func:`lora_shrink` computes it, without copying
    ``x`` where the branch runs in ``x``'s dtype: cuBLAS when the rows have one stride (a
    strided 2-D view), else this module's kernel as a plain GEMM over the two row
    strides (a transposed ``(T, B, K)`` input, say)."""
    M, K = rows.M, lora_A.shape[1]
    x2 = as_2d(rows, K)
    if x2 is not None:
        return lora_shrink(x2, lora_A)
    if lora_in_fp32(rows.x.dtype, lora_A.dtype):  # upcast anyway: one copy of the rows
        return lora_shrink(rows.x.reshape(M, K), lora_A)
    A = lora_A.to(rows.x.dtype)
    xa = torch.empty((rows.M, A.shape[0]), device=rows.x.device, dtype=rows.x.dtype)
    cfg = INTERPRETER_CONFIG if interpreter_active() else _SHRINK_CONFIG
    _launch(cfg, rows, A, None, None, None, None, 0.0, xa)
    return xa


def _reduce_splits(partial: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
    split, M, N = partial.shape
    grid = (cdiv(M, _REDUCE_BLOCK_M), cdiv(N, _REDUCE_BLOCK_N))
    _splitk_reduce_kernel[grid](
        p_ptr=partial, bias_ptr=bias if bias is not None else partial, y_ptr=y,
        M=M, N=N,
        stride_ps=partial.stride(0), stride_pm=partial.stride(1), stride_pn=partial.stride(2),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=_REDUCE_BLOCK_M,
        BLOCK_N=_REDUCE_BLOCK_N,
        num_warps=4,
    )
