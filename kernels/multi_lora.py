"""Mixed-adapter LoRA linear: every row of one batch with its own adapter (or none).

Math (PEFT layout; adapters stacked in fixed slots ``i = 0 .. S-1``)::

    y[m] = x[m] W^T + b                                   if slot[m] == -1
    y[m] = x[m] W^T + b + s_i * (x[m] A_i^T) B_i^T         if slot[m] == i

with ``W: (N, K)``, ``A_i = A[i, :r_i]: (r_i, K)``, ``B_i = B[i, :, :r_i]: (N, r_i)``. Each
slot has its own rank ``r_i <= max_rank`` and scaling ``s_i``; the stacks are padded to
``max_rank`` but no kernel reads or multiplies past ``r_i`` (ranks are loop bounds).

The technique is the one of Punica's SGMV and vLLM's LoRA ops: rows are ordered by slot
(a stable sort, done on the device with no host sync: :class:`MultiLoraMeta`), so each
slot's rows form one contiguous *segment*, and the low-rank work is done per segment
with that segment's rank.

Two kernels, three steps:

1. **shrink** (:func:`_mlora_shrink_kernel`), grid ``(row tiles, S, SPLIT_K)``: program
   ``(t, i, k)`` takes row tile ``t`` of segment ``i`` and computes
   ``xa[p, :r_i] = x[row(p)] A_i^T`` over its share of K (fp32 partials, one per split;
   split-K feeds the GPU at decode, where a batch has few rows). Programs whose tile is
   past the end of their segment, or whose slot has rank 0, exit at once.
2. **base + expand** (:func:`_mlora_expand_kernel`), grid ``(row tiles x N tiles)`` over
   the rows in sorted order: the tile computes ``acc = x W^T`` (``FUSE_BASE``) or reads
   ``y`` that cuBLAS already holds, then adds ``(s_i * xa) B_i^T`` row by row's slot,
   in rank chunks up to ``r_i``, in one of two ways: walk the segments that overlap the
   tile with one ``tl.dot`` each (prefill: few, long segments), or (``GATHER``, decode:
   many short segments) gather every row's own ``B_i`` chunk in one load and reduce on
   the CUDA cores, with no serial chain of dependent loads per segment. The tile is
   stored at the rows' original positions. Rows with no adapter sort last: with the
   base split out, a tile of base-only rows exits at once and leaves ``y`` as cuBLAS
   wrote it; with the base fused they get the tile's ``x W^T + b`` and nothing else
   (the base's math, though not cuBLAS's bits: a different GEMM rounds differently, as
   cuBLAS itself does between batch sizes).

Rows are read and written through the sorted row index (gather/scatter of whole rows
inside the kernel), so neither ``x`` nor ``y`` is permuted in memory.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .autotune import KernelConfig, m_bucket, pick, will_time
from .multi_lora_meta import (
    EXPAND_BLOCK_R, FUSE_BASE_MAX_M, GATHER_MAX_M, MultiLoraLaunch, MultiLoraMeta, block_r_for_dot, expand_candidates,
    gather_block_r, launch_trials, shrink_block_r, shrink_plan,
)
from .runtime import (
    Rows, cdiv, check_interpretable, input_precision, interpreter_active, k_splits, lora_in_fp32, on_device,
    output_for, rows_view,
)
from .tiles import (
    add_bias, gemm_k_loop, grouped_tile, lora_expand_gathered, lora_expand_segments, row_offsets, slot_column_scale,
)

__all__ = ["multi_lora_linear_fwd"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mlora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, xa_ptr, sorted_rows_ptr, slot_rows_ptr, slot_start_ptr, rank_ptr,
    # sizes
    K, M_INNER, K_PER_SPLIT,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_xas, stride_xap, stride_xar,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``xa[k, p, j] = sum_{kk in split k} x[row(p), kk] A[i, j, kk]`` for ``j < r_i``.

    ``p`` runs over the sorted positions of slot ``i``'s segment (this program's row
    tile of it); ``k`` is this program's K split. Accumulates in fp32 and stores fp32;
    the dot's operands are rounded as ``tiles.lora_dot`` says. The ranks are walked in
    ``BLOCK_R`` chunks, each one pass over the tile's ``x`` rows: the launcher sizes
    ``BLOCK_R`` to the stack's padded rank (up to 64), so ``x`` is read once.
    """
    pid_m = tl.program_id(axis=0)
    slot = tl.program_id(axis=1)
    pid_k = tl.program_id(axis=2)
    n_rows = tl.load(slot_rows_ptr + slot)
    R = tl.load(rank_ptr + slot)
    if (pid_m * BLOCK_M >= n_rows) | (R <= 0):
        return
    start = tl.load(slot_start_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions inside the segment
    mask_m = offs_m < n_rows
    rows = tl.load(sorted_rows_ptr + start + offs_m, mask=mask_m, other=0)
    row_off = row_offsets(rows, M_INNER, stride_xm0, stride_xm1)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    offs_p = (start + offs_m).to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc = gemm_k_loop(
            acc, x_ptr, row_off, mask_m, a_base, offs_r, mask_r, k_start, k_end,
            stride_xk, stride_ar, stride_ak, BLOCK_K, INPUT_PRECISION, LORA_FP32=LORA_FP32,
        )
        xa_ptrs = xa_ptr + pid_k * stride_xas + offs_p[:, None] * stride_xap + offs_r[None, :] * stride_xar
        tl.store(xa_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


# Over 60 lines: its grouped argument list (pointers, sizes, strides, constexprs) is a third of it.
@triton.jit
def _mlora_expand_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, b_ptr, xa_ptr, mag_ptr, y_ptr,
    sorted_rows_ptr, sorted_slot_ptr, seg_end_ptr, rank_ptr, scaling_ptr,
    # sizes
    M, N, K, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_bs, stride_bn, stride_br,
    stride_xas, stride_xap, stride_xar,
    stride_ym, stride_yn,
    stride_ms,
    # meta
    FUSE_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATHER: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_MAG: tl.constexpr = False,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile, rows in sorted order: base plus each segment's expand.

    ``acc = x W^T + b`` (``FUSE_BASE``; else ``acc = y``, the base cuBLAS wrote). Then for
    each sorted position ``p`` of slot ``i >= 0`` in the tile and each rank chunk
    ``j0 < r_i``: ``acc[p] += xa[p, j0:j0+BLOCK_R] (s_i B[i, :, j0:j0+BLOCK_R])^T`` (``xa``
    summed over its K splits, then rounded to the input dtype, as an unfused
    low-precision LoRA branch would; kept in fp32 with ``LORA_FP32``, see
    ``tiles.lora_dot``), by :func:`~tiles.lora_expand_gathered` (``GATHER``) or
    :func:`~tiles.lora_expand_segments`. Stored at ``row(p)``.

    ``HAS_MAG`` (DoRA slots): row ``p`` of slot ``i`` becomes
    ``mag[i] * (x W^T + s_i xa B_i^T) + b`` (``mag: (S, N)`` fp32, ones for a LoRA slot):
    the bias goes on after the scale (subtracted first from the rows with an adapter
    when the base comes from cuBLAS); rows with no adapter are left as the base.
    """
    pid = tl.program_id(axis=0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    tile_start = pid_m * BLOCK_M
    tile_end = tl.minimum(M, tile_start + BLOCK_M)
    if not FUSE_BASE:
        # Base-only rows sort last: a tile that starts with one has nothing to add.
        if tl.load(sorted_slot_ptr + tile_start) < 0:
            return

    offs_p = tile_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < M
    mask_n = offs_n < N
    rows = tl.load(sorted_rows_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_p[:, None] & mask_n[None, :]
    if FUSE_BASE:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = gemm_k_loop(
            acc, x_ptr, row_offsets(rows, M_INNER, stride_xm0, stride_xm1), mask_p, w_ptr, offs_n, mask_n,
            0, K, stride_xk, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION,
        )
        if HAS_BIAS and not HAS_MAG:
            acc = add_bias(acc, bias_ptr, offs_n, mask_n)
    else:
        acc = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
    if HAS_MAG:
        slot_p = tl.load(sorted_slot_ptr + offs_p, mask=mask_p, other=-1)
        if HAS_BIAS:
            # The bias to put back after the scale: every row's with the base fused, else
            # only the rows with an adapter (the others keep cuBLAS's y untouched).
            b_n = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if FUSE_BASE:
                keep_b = b_n[None, :]
            else:
                keep_b = tl.where((slot_p >= 0)[:, None], b_n[None, :], 0.0)
                acc -= keep_b

    dtype = x_ptr.dtype.element_ty
    if GATHER:
        acc = lora_expand_gathered(
            acc, dtype, b_ptr, xa_ptr, sorted_slot_ptr, rank_ptr, scaling_ptr, offs_p, mask_p, offs_n, mask_n,
            stride_bs, stride_bn, stride_br, stride_xas, stride_xap, stride_xar, SPLIT_K, BLOCK_M, BLOCK_R,
            LORA_FP32,
        )
    else:
        acc = lora_expand_segments(
            acc, dtype, b_ptr, xa_ptr, sorted_slot_ptr, seg_end_ptr, rank_ptr, scaling_ptr,
            tile_start, tile_end, offs_p, offs_n, mask_n,
            stride_bs, stride_bn, stride_br, stride_xas, stride_xap, stride_xar,
            SPLIT_K, BLOCK_M, BLOCK_R, LORA_FP32, INPUT_PRECISION,
        )
    if HAS_MAG:
        acc = acc * slot_column_scale(mag_ptr, slot_p, offs_n, mask_n, stride_ms)
        if HAS_BIAS:
            acc += keep_b
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


# --------------------------------------------------------------------------- launch


def multi_lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    meta: MultiLoraMeta,
    launch: Optional[MultiLoraLaunch] = None,
    config: Optional[KernelConfig] = None,
    out: Optional[torch.Tensor] = None,
    mag: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T`` with ``i = meta.row_slot[m]``;
    with ``mag`` (DoRA), ``y[m] = mag[i] * (x[m] W^T + s_i (x[m] A_i^T) B_i^T) + b``.

    Args:
        x: ``(..., K)``, any strides, fp32/fp16/bf16; its rows (leading dims flattened)
            are ``meta``'s rows.
        weight: ``(N, K)``; bias: ``(N,)`` or None; both in ``x``'s dtype.
        lora_A: ``(S, max_rank, K)``; lora_B: ``(S, N, max_rank)`` (slot stacks, any
            float dtype; read up to each slot's rank only).
        ranks: ``(S,)`` int32, ``0 <= r_i <= max_rank`` (0: the slot adds nothing).
        scalings: ``(S,)`` fp32.
        meta: :class:`MultiLoraMeta` of the batch (``num_slots == S``).
        launch, config: force launch choices (tests, benchmarks).
        out: optional preallocated contiguous output of shape ``(..., N)`` (tests poison
            it to catch unwritten elements).
        mag: optional ``(S, N)`` fp32 DoRA column scales per slot (unit last stride;
            ones for a LoRA slot), applied in the expand's epilogue.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`runtime.check_interpretable`).
    """
    check_interpretable(x.dtype)
    launch = launch or MultiLoraLaunch()
    N = weight.shape[0]
    if out is not None:
        output_for(x, N, out)  # checks it
    if math.prod(x.shape[:-1]) == 0 or N == 0:
        return output_for(x, N, out)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    args = (x, weight, bias, lora_A, lora_B, ranks, scalings, meta, mag)
    with on_device(x):
        if (launch.fuse_base is None or launch.gather is None) and x.is_cuda:
            launch = _tuned_launch(launch, args, config, out)
        return _forward(*args, launch=launch, config=config, out=out)


def _tuned_launch(launch: MultiLoraLaunch, args: tuple, config: Optional[KernelConfig], out) -> MultiLoraLaunch:
    """Fill the open choices of ``launch`` (base GEMM fused or left to cuBLAS; B gathered
    per row or walked per segment) with the fastest end-to-end combination on this GPU,
    timed once per shape and M bucket by the tuner: the split runs only where it measures
    faster. Untimed (interpreter, CUDA-graph capture): the choices by M."""
    x, weight, bias, lora_A, lora_B = args[:5]
    has_mag = len(args) > 8 and args[8] is not None  # DoRA scales (args[8]) change the epilogue
    M = math.prod(x.shape[:-1])
    key = ("multi_lora_launch", x.device.index, x.dtype, input_precision(x.dtype), lora_A.dtype, lora_B.dtype,
           weight.shape, lora_A.shape, bias is None, has_mag, launch.fuse_base, launch.gather, m_bucket(M))

    def run(trial: MultiLoraLaunch) -> None:
        _forward(*args, launch=trial, config=config, out=out)

    best = pick(key, run, lambda: launch_trials(launch, M), fixed=launch)
    return dataclasses.replace(launch, fuse_base=best.fuse_base, gather=best.gather)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    meta: MultiLoraMeta,
    mag: Optional[torch.Tensor] = None,
    *,
    launch: MultiLoraLaunch,
    config: Optional[KernelConfig],
    out: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`multi_lora_linear_fwd` with the launch choices made (``None``: by M)."""
    N, K = weight.shape
    rows = rows_view(x)
    M = rows.M
    fuse = launch.fuse_base if launch.fuse_base is not None else M <= FUSE_BASE_MAX_M
    gather = launch.gather if launch.gather is not None else M <= GATHER_MAX_M
    if fuse:
        y = output_for(x, N, out)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
        if out is not None:
            y = out.copy_(y)
        elif not y.is_contiguous():
            y = y.contiguous()
    y2 = y.view(M, N)
    if lora_A.shape[0] == 0 or K == 0:
        if fuse:  # nothing to add, but the base still has to be written
            y2.copy_(torch.nn.functional.linear(rows.x.reshape(M, K), weight, bias))
        return y

    lora_fp32 = lora_in_fp32(x.dtype, lora_A.dtype)
    xa = _launch_shrink(rows, lora_A, ranks, meta, launch, lora_fp32)

    def run(cfg: KernelConfig) -> None:
        _launch_expand(cfg, rows, weight, bias, lora_B, xa, ranks, scalings, meta, y2,
                       fuse=fuse, gather=gather, launch=launch, lora_fp32=lora_fp32, mag=mag)

    if config is None:
        config = _expand_config(x, weight, bias, lora_A, lora_B, xa, y2, run, fuse=fuse, gather=gather,
                                has_mag=mag is not None)
    run(config)
    return y


def _expand_config(
    x, weight, bias, lora_A, lora_B, xa, y2, run, *, fuse: bool, gather: bool, has_mag: bool = False
) -> KernelConfig:
    """The tuner's expand tiles for this call. Timing re-runs the expand on the same
    inputs; without the fused base that would add the LoRA terms again into ``y``, so
    then it times on a scratch copy of ``y``'s base."""
    M, (N, K) = y2.shape[0], weight.shape
    key = ("multi_lora", x.device.index, x.dtype, input_precision(x.dtype), lora_A.dtype, lora_B.dtype, N, K,
           fuse, gather, bias is None, has_mag, xa.shape[0], m_bucket(M))

    def candidates():
        return expand_candidates(M, x.dtype, fuse, gather, xa.shape[0])

    if fuse or not will_time(key):
        return pick(key, run, candidates)
    base = y2.clone()

    def run_scratch(cfg: KernelConfig) -> None:
        y2.copy_(base)
        run(cfg)

    config = pick(key, run_scratch, candidates)
    y2.copy_(base)
    return config


def _launch_shrink(
    rows: Rows, lora_A: torch.Tensor, ranks: torch.Tensor, meta: MultiLoraMeta, launch: MultiLoraLaunch, lora_fp32: bool
) -> torch.Tensor:
    """``xa``: the shrink's fp32 partials per K split, ``(split_k, M, max_rank)``, in sorted
    row order (never zeroed: the expand reads only the positions and ranks it wrote)."""
    S, max_rank, K = lora_A.shape
    block_m, block_k, split_k = shrink_plan(rows.M, K, launch)
    k_per_split, split_k = k_splits(K, split_k, block_k)
    xa = torch.empty((split_k, rows.M, max_rank), device=rows.x.device, dtype=torch.float32)
    interp = interpreter_active()
    _mlora_shrink_kernel[(cdiv(rows.M, block_m), S, split_k)](
        x_ptr=rows.x, a_ptr=lora_A, xa_ptr=xa, sorted_rows_ptr=meta.sorted_rows, slot_rows_ptr=meta.slot_rows,
        slot_start_ptr=meta.slot_start, rank_ptr=ranks,
        K=K, M_INNER=rows.m_inner, K_PER_SPLIT=k_per_split,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_as=lora_A.stride(0), stride_ar=lora_A.stride(1), stride_ak=lora_A.stride(2),
        stride_xas=xa.stride(0), stride_xap=xa.stride(1), stride_xar=xa.stride(2),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r_for_dot(launch.block_r) if launch.block_r else shrink_block_r(max_rank),
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        num_warps=1 if interp else 4,
        num_stages=1 if interp else 3,
    )
    return xa


def _launch_expand(
    cfg: KernelConfig,
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    meta: MultiLoraMeta,
    y2: torch.Tensor,
    *,
    fuse: bool,
    gather: bool,
    launch: MultiLoraLaunch,
    lora_fp32: bool,
    mag: Optional[torch.Tensor] = None,
) -> None:
    """One launch of the base + expand kernel with ``cfg``'s tiles, into ``y2`` (``(M, N)``)."""
    M, (N, K) = rows.M, weight.shape
    if gather:
        block_r = launch.gather_block_r or gather_block_r(cfg)
    else:
        block_r = block_r_for_dot(launch.block_r or EXPAND_BLOCK_R)
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _mlora_expand_kernel[grid](
        x_ptr=rows.x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, b_ptr=lora_B, xa_ptr=xa,
        mag_ptr=mag if mag is not None else xa, y_ptr=y2,
        sorted_rows_ptr=meta.sorted_rows, sorted_slot_ptr=meta.sorted_slot, seg_end_ptr=meta.seg_end,
        rank_ptr=ranks, scaling_ptr=scalings,
        M=M, N=N, K=K, M_INNER=rows.m_inner,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_bs=lora_B.stride(0), stride_bn=lora_B.stride(1), stride_br=lora_B.stride(2),
        stride_xas=xa.stride(0), stride_xap=xa.stride(1), stride_xar=xa.stride(2),
        stride_ym=y2.stride(0), stride_yn=y2.stride(1),
        stride_ms=mag.stride(0) if mag is not None else 0,
        FUSE_BASE=fuse,
        HAS_BIAS=bias is not None,
        HAS_MAG=mag is not None,
        GATHER=gather,
        SPLIT_K=xa.shape[0],
        BLOCK_R=block_r,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        **cfg.meta,
    )
