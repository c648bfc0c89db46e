"""Mixed-adapter LoRA linear: every row of one batch with its own adapter (or none).

Math (PEFT layout; adapters stacked in fixed slots ``i = 0 .. S-1``)::

    y[m] = x[m] W^T + b                                   if slot[m] == -1
    y[m] = x[m] W^T + b + s_i * (x[m] A_i^T) B_i^T         if slot[m] == i

with ``W: (N, K)``, ``A_i = A[i, :r_i]: (r_i, K)``, ``B_i = B[i, :, :r_i]: (N, r_i)``. Each
slot has its own rank ``r_i <= max_rank`` and scaling ``s_i``; the stacks are padded to
``max_rank`` but no kernel reads or multiplies past ``r_i`` (ranks are loop bounds).

The technique is the one of Punica's SGMV and vLLM's LoRA ops: rows are ordered by slot
(a stable sort, done on the device with no host sync), so each slot's rows form one
contiguous *segment*, and the low-rank work is done per segment with that segment's rank.

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
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
import triton.testing

from fastpeft.kernels import lora as _lora
from fastpeft.kernels.tiles import grouped_tile, lora_dot
from fastpeft.kernels.lora import (
    LoraKernelConfig,
    _gpu_candidates,
    _input_precision,
    _m_bucket,
    _pick_config,
    capturing,
    check_interpretable,
    interpreter_active,
    lora_in_fp32,
    on_device,
    rows_view,
)

__all__ = [
    "MultiLoraMeta",
    "MultiLoraLaunch",
    "multi_lora_linear_fwd",
    "FUSE_BASE_MAX_M",
    "GATHER_MAX_M",
]


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class MultiLoraMeta:
    """Which rows use which adapter slot: built once per batch, shared by every layer.

    Running example, 5 rows and ``S = 3`` slots::

        row_slot    = [ 2, -1,  0,  2,  0]   # slot of each row in x (-1: base only)
        sorted_rows = [ 2,  4,  0,  3,  1]   # rows ordered by slot, base-only rows last
        sorted_slot = [ 0,  0,  2,  2, -1]   # slot of each sorted position
        seg_end     = [ 2,  2,  4,  4,  5]   # one past the last position of its segment
        slot_rows   = [ 2,  0,  2]           # rows per slot
        slot_start  = [ 0,  2,  2]           # first sorted position of each slot

    Segment of slot 2 = sorted positions ``[slot_start[2], slot_start[2] + slot_rows[2])``
    = ``[2, 4)`` = rows ``{0, 3}``. All tensors are int32 on the batch's device; every
    shape depends only on ``M`` and ``S``, and building them needs no host sync, so the
    metadata can be rebuilt inside a captured CUDA graph.
    """

    row_slot: torch.Tensor
    sorted_rows: torch.Tensor
    sorted_slot: torch.Tensor
    seg_end: torch.Tensor
    slot_rows: torch.Tensor
    slot_start: torch.Tensor
    num_slots: int

    @property
    def num_rows(self) -> int:
        return self.row_slot.shape[0]

    @classmethod
    def build(cls, row_slot: torch.Tensor, num_slots: int) -> "MultiLoraMeta":
        """Metadata for ``row_slot`` (``(M,)`` integers in ``[-1, num_slots)``).

        Values are not range-checked here (that would need a host sync); callers that
        take slots from users check them (``fastpeft.ops_multi`` does).
        """
        if row_slot.dim() != 1:
            raise ValueError(f"row_slot must be 1-D (one slot per row), got shape {tuple(row_slot.shape)}")
        S = int(num_slots)
        dev = row_slot.device
        slot = row_slot.to(torch.int64)
        key = torch.where(slot < 0, torch.full_like(slot, S), slot)  # base-only rows sort last
        sorted_key, order = torch.sort(key, stable=True)
        slots = torch.arange(S, device=dev, dtype=torch.int64)
        start = torch.searchsorted(sorted_key, slots)
        stop = torch.searchsorted(sorted_key, slots, right=True)
        seg_end = torch.searchsorted(sorted_key, sorted_key, right=True)
        sorted_slot = torch.where(sorted_key == S, torch.full_like(sorted_key, -1), sorted_key)
        i32 = torch.int32
        return cls(
            row_slot=slot.to(i32),
            sorted_rows=order.to(i32),
            sorted_slot=sorted_slot.to(i32),
            seg_end=seg_end.to(i32),
            slot_rows=(stop - start).to(i32),
            slot_start=start.to(i32),
            num_slots=S,
        )

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The metadata tensors in the order the op layer passes them."""
        return (self.row_slot, self.sorted_rows, self.sorted_slot, self.seg_end, self.slot_rows, self.slot_start)


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
    the dot's operands are rounded as ``tiles.lora_dot`` says.
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
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < n_rows
    rows = tl.load(sorted_rows_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    row_off = (rows // M_INNER) * stride_xm0 + (rows % M_INNER) * stride_xm1
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    offs_p = (start + offs_m).to(tl.int64)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)

    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < k_end
            # int64: a transposed x has stride_xk = M, and K * M can pass 2^31.
            x_tile = tl.load(x_ptr + row_off[:, None] + kk.to(tl.int64)[None, :] * stride_xk,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_tile = tl.load(a_base + (r0 + offs_r)[None, :] * stride_ar + kk[:, None] * stride_ak,
                             mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            acc = lora_dot(x_tile, a_tile, acc, x_tile.dtype, LORA_FP32, INPUT_PRECISION)
        xa_ptrs = (xa_ptr + pid_k * stride_xas + offs_p[:, None] * stride_xap
                   + (r0 + offs_r)[None, :] * stride_xar)
        tl.store(xa_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _mlora_expand_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, b_ptr, xa_ptr, y_ptr,
    sorted_rows_ptr, sorted_slot_ptr, seg_end_ptr, rank_ptr, scaling_ptr,
    # sizes
    M, N, K, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_bs, stride_bn, stride_br,
    stride_xas, stride_xap, stride_xar,
    stride_ym, stride_yn,
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
):
    """One ``(BLOCK_M, BLOCK_N)`` tile, rows in sorted order: base plus each segment's expand.

    ``acc = x W^T + b`` (``FUSE_BASE``; else ``acc = y``, the base cuBLAS wrote). Then for
    each segment ``[p0, p1)`` of slot ``i >= 0`` overlapping the tile and each rank chunk
    ``j0 < r_i``: ``acc += xa[p, j0:j0+BLOCK_R] (s_i B[i, n, j0:j0+BLOCK_R])^T`` for the
    tile's positions ``p in [p0, p1)`` (``xa`` summed over its K splits, then rounded to
    the input dtype, as an unfused low-precision LoRA branch would; kept in fp32 with
    ``LORA_FP32``, see ``tiles.lora_dot``). Stored at ``row(p)``.
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
    offs_r = tl.arange(0, BLOCK_R)
    mask_p = offs_p < M
    mask_n = offs_n < N
    rows = tl.load(sorted_rows_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask_y = mask_p[:, None] & mask_n[None, :]

    if FUSE_BASE:
        offs_k = tl.arange(0, BLOCK_K)
        row_off = (rows // M_INNER) * stride_xm0 + (rows % M_INNER) * stride_xm1
        x_ptrs = x_ptr + row_off[:, None] + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            x_tile = tl.load(x_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    else:
        acc = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)

    offs_p64 = offs_p.to(tl.int64)
    if GATHER:
        # Every row gathers its own slot's B chunk: one (BLOCK_M, BLOCK_N, BLOCK_R) load
        # per rank chunk, no serial walk over the tile's segments (decode batches, where
        # a tile holds many short segments). Rank chunks run to the tile's largest rank.
        slot_p = tl.load(sorted_slot_ptr + offs_p, mask=mask_p, other=-1)
        has = slot_p >= 0
        slot_c = tl.where(has, slot_p, 0)
        r_row = tl.load(rank_ptr + slot_c, mask=has, other=0)
        s_row = tl.load(scaling_ptr + slot_c, mask=has, other=0.0)
        r_tile = tl.max(r_row, axis=0)
        b_rows = b_ptr + slot_c.to(tl.int64) * stride_bs
        for r0 in range(0, r_tile, BLOCK_R):
            rr = r0 + offs_r
            mask_xa = rr[None, :] < r_row[:, None]
            xa_ptrs = xa_ptr + offs_p64[:, None] * stride_xap + rr[None, :] * stride_xar
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for sk in range(SPLIT_K):
                xa += tl.load(xa_ptrs + sk * stride_xas, mask=mask_xa, other=0.0)
            # x A^T and B rounded as the unfused low-precision branch rounds them (kept in
            # fp32 with LORA_FP32); s applied in fp32 after (scaling first could overflow
            # fp16 where the reference does not).
            bg_ptrs = b_rows[:, None, None] + offs_n[None, :, None] * stride_bn + rr[None, None, :] * stride_br
            bg = tl.load(bg_ptrs, mask=mask_xa[:, None, :] & mask_n[None, :, None], other=0.0)
            if LORA_FP32:
                xa_lp = xa * s_row[:, None]
                bg = bg.to(tl.float32)
            else:
                xa_lp = xa.to(x_ptr.dtype.element_ty).to(tl.float32) * s_row[:, None]
                bg = bg.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.sum(xa_lp[:, None, :] * bg, axis=2)
    else:
        p = tile_start
        while p < tile_end:
            slot = tl.load(sorted_slot_ptr + p)
            p_end = tl.minimum(tl.load(seg_end_ptr + p), tile_end)
            if slot >= 0:
                R = tl.load(rank_ptr + slot)
                s = tl.load(scaling_ptr + slot)
                in_seg = (offs_p >= p) & (offs_p < p_end)
                b_base = b_ptr + slot.to(tl.int64) * stride_bs
                for r0 in range(0, R, BLOCK_R):
                    mask_r = (r0 + offs_r) < R
                    xa_ptrs = xa_ptr + offs_p64[:, None] * stride_xap + (r0 + offs_r)[None, :] * stride_xar
                    mask_xa = in_seg[:, None] & mask_r[None, :]
                    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for sk in range(SPLIT_K):
                        xa += tl.load(xa_ptrs + sk * stride_xas, mask=mask_xa, other=0.0)
                    bt_tile = tl.load(b_base + offs_n[None, :] * stride_bn + (r0 + offs_r)[:, None] * stride_br,
                                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                    # s on B, not on xa: see lora_expand_resident.
                    bt_scaled = bt_tile.to(tl.float32) * s
                    acc = lora_dot(xa, bt_scaled, acc, x_ptr.dtype.element_ty, LORA_FP32, INPUT_PRECISION)
            p = p_end

    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


# --------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class MultiLoraLaunch:
    """Launch choices beyond the expand tile config (benchmarks and tests force them).

    ``fuse_base``: base GEMM inside the expand kernel (True) or by cuBLAS first (False)
    (None: timed both ways on a GPU, see ``_tuned_launch``; by M elsewhere);
    None picks by M (:data:`FUSE_BASE_MAX_M`). ``gather``: the expand gathers each row's
    own B chunk (True) or walks the tile's segments with one ``tl.dot`` each (False);
    None picks by M (:data:`GATHER_MAX_M`). ``split_k``: K splits of the shrink (None:
    by M). ``shrink_block_m``, ``block_r``: shrink row tile and rank chunk (also the
    expand's rank chunk when walking segments); ``gather_block_r``: the expand's rank
    chunk when gathering (None: by tile size, :func:`gather_block_r`).
    """

    fuse_base: Optional[bool] = None
    gather: Optional[bool] = None
    split_k: Optional[int] = None
    shrink_block_m: Optional[int] = None
    block_r: int = 16
    gather_block_r: Optional[int] = None


# Largest M for which the base GEMM runs inside the expand kernel when nothing was timed
# (the interpreter; on a GPU the launcher times both ways per shape and M bucket, see
# ``_tuned_launch``). Above it, cuBLAS computes the base and the expand kernel adds the
# LoRA terms in place: a plain Triton GEMM trails cuBLAS by 1.2-1.4x at large M on
# Hopper (../shared/anchors/), while the split costs one extra read+write of y.
FUSE_BASE_MAX_M = 64

# Largest M for which the expand gathers each row's B instead of walking segments (the
# default where nothing was timed, as FUSE_BASE_MAX_M). At
# decode a row tile holds many short segments, and the segment walk is a serial chain of
# dependent loads (slot -> B chunk -> dot) per segment; the gather issues one load per
# rank chunk for the whole tile. At prefill segments are long and tl.dot wins. A first
# guess, unmeasured: benchmarks/bench_multi.py times both ("fastpeft_seg"/"_gather").
GATHER_MAX_M = 64

_INTERPRETER_SHRINK_BLOCK_K = 32


def block_r_for_dot(block_r: int) -> int:
    """A rank chunk that ``tl.dot`` accepts (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(int(block_r)))


def gather_block_r(cfg: LoraKernelConfig) -> int:
    """Rank chunk of the gathering expand: the gathered ``(BLOCK_M, BLOCK_N, chunk)`` B
    tile lives in registers, so keep it near 32 values per thread (no spills on sm_90 for
    the decode tiles, checked with ptxas), between 1 and 8."""
    budget = 32 * 32 * cfg.num_warps
    br = 8
    while br > 1 and cfg.block_m * cfg.block_n * br > budget:
        br //= 2
    return br


def _shrink_plan(M: int, K: int, launch: MultiLoraLaunch) -> Tuple[int, int, int]:
    """``(block_m, block_k, split_k)`` of the shrink kernel."""
    interp = interpreter_active()
    block_k = _INTERPRETER_SHRINK_BLOCK_K if interp else 64
    block_m = launch.shrink_block_m or (16 if (interp or M <= 256) else 64)
    if launch.split_k is not None:
        split_k = launch.split_k
    elif interp:
        split_k = 1
    else:
        # Few rows: one program per (tile, slot) is too little work to fill the GPU.
        split_k = 8 if M <= 64 else (4 if M <= 512 else 1)
    split_k = max(1, min(split_k, triton.cdiv(K, block_k)))
    return block_m, block_k, split_k


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
    config: Optional[LoraKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T`` with ``i = meta.row_slot[m]``.

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

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (``lora.check_interpretable``).
    """
    check_interpretable(x.dtype)
    launch = launch or MultiLoraLaunch()
    N, K = weight.shape
    lead = x.shape[:-1]
    if out is not None and (out.shape != (*lead, N) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*lead, N)}")
    M = math.prod(lead)
    if M == 0 or N == 0:
        return out if out is not None else torch.empty((*lead, N), device=x.device, dtype=x.dtype)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    args = (x, weight, bias, lora_A, lora_B, ranks, scalings, meta)
    with on_device(x):
        if (launch.fuse_base is None or launch.gather is None) and not interpreter_active() and x.is_cuda:
            launch = _tuned_launch(launch, args, config, out)
        return _forward(*args, launch=launch, config=config, out=out)


# (fuse_base, gather) chosen per shape and M bucket by timing every open combination.
_LAUNCH_CHOICE: Dict[Tuple, Tuple[bool, bool]] = {}


def _tuned_launch(launch: "MultiLoraLaunch", args: tuple, config, out) -> "MultiLoraLaunch":
    """Fill the open choices of ``launch`` (base GEMM fused or left to cuBLAS; B gathered
    per row or walked per segment) with the fastest end-to-end combination on this GPU,
    timed once per shape and M bucket: the split runs only where it measures faster."""
    x, weight, bias, lora_A, lora_B = args[:5]
    M = math.prod(x.shape[:-1])
    key = (x.device.index, x.dtype, lora_A.dtype, lora_B.dtype, weight.shape, lora_A.shape, bias is None, launch.fuse_base,
           launch.gather, _m_bucket(M))
    choice = _LAUNCH_CHOICE.get(key)
    if choice is None and capturing():
        return launch  # no timing inside a CUDA-graph capture: the by-M defaults, uncached
    if choice is None:
        fuses = [launch.fuse_base] if launch.fuse_base is not None else [True, False]
        gathers = [launch.gather] if launch.gather is not None else [True, False]
        timed = []
        for fuse in fuses:
            for gather in gathers:
                trial = dataclasses.replace(launch, fuse_base=fuse, gather=gather)
                ms = triton.testing.do_bench(
                    lambda: _forward(*args, launch=trial, config=config, out=out), warmup=5, rep=20
                )
                timed.append((ms, fuse, gather))
        _, fuse, gather = min(timed)
        choice = _LAUNCH_CHOICE[key] = (fuse, gather)
    return dataclasses.replace(launch, fuse_base=choice[0], gather=choice[1])


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    meta: MultiLoraMeta,
    *,
    launch: "MultiLoraLaunch",
    config: Optional[LoraKernelConfig],
    out: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`multi_lora_linear_fwd` with the launch choices made (``None``: by M)."""
    N, K = weight.shape
    S = lora_A.shape[0]
    lead = x.shape[:-1]
    xv, M, m_inner, s_m0, s_m1, s_k = rows_view(x)
    fuse = launch.fuse_base if launch.fuse_base is not None else M <= FUSE_BASE_MAX_M
    gather = launch.gather if launch.gather is not None else M <= GATHER_MAX_M
    if fuse:
        y = out if out is not None else torch.empty((*lead, N), device=x.device, dtype=x.dtype)
    else:
        y = torch.nn.functional.linear(x, weight, bias)
        if out is not None:
            y = out.copy_(y)
        elif not y.is_contiguous():
            y = y.contiguous()
    y2 = y.view(M, N)
    if S == 0 or K == 0:
        if fuse:  # nothing to add, but the base still has to be written
            y2.copy_(torch.nn.functional.linear(xv.reshape(M, K), weight, bias))
        return y

    precision = _input_precision(x.dtype)
    lora_fp32 = lora_in_fp32(x.dtype, lora_A.dtype)
    block_r = block_r_for_dot(launch.block_r)
    # shrink: fp32 partials per K split, in sorted row order (never zeroed: the expand
    # reads only the positions and ranks the shrink wrote).
    sbm, sbk, split_k = _shrink_plan(M, K, launch)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), sbk) * sbk
    split_k = triton.cdiv(K, k_per_split)
    xa = torch.empty((split_k, M, lora_A.shape[1]), device=x.device, dtype=torch.float32)
    _mlora_shrink_kernel[(triton.cdiv(M, sbm), S, split_k)](
        xv, lora_A, xa, meta.sorted_rows, meta.slot_rows, meta.slot_start, ranks,
        K, m_inner, k_per_split,
        s_m0, s_m1, s_k,
        lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        xa.stride(0), xa.stride(1), xa.stride(2),
        BLOCK_M=sbm,
        BLOCK_K=sbk,
        BLOCK_R=block_r,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=precision,
        num_warps=1 if interpreter_active() else 4,
        num_stages=1 if interpreter_active() else 3,
    )

    def run(cfg: LoraKernelConfig) -> None:
        if gather:
            expand_block_r = launch.gather_block_r or gather_block_r(cfg)
        else:
            expand_block_r = block_r
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _mlora_expand_kernel[grid](
            xv, weight, bias if bias is not None else weight, lora_B, xa, y2,
            meta.sorted_rows, meta.sorted_slot, meta.seg_end, ranks, scalings,
            M, N, K, m_inner,
            s_m0, s_m1, s_k,
            weight.stride(0), weight.stride(1),
            lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            xa.stride(0), xa.stride(1), xa.stride(2),
            y2.stride(0), y2.stride(1),
            FUSE_BASE=fuse,
            HAS_BIAS=bias is not None,
            GATHER=gather,
            SPLIT_K=split_k,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_R=expand_block_r,
            GROUP_M=cfg.group_m,
            LORA_FP32=lora_fp32,
            INPUT_PRECISION=precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    if config is None:
        # Timing candidates re-run the expand on the same inputs; without the fused base
        # that would add the LoRA terms twice into y, so time on a scratch copy.
        key = ("multi_lora", x.device.index, x.dtype, precision, lora_A.dtype, lora_B.dtype, N, K, fuse, gather, bias is None,
               split_k, _m_bucket(M))
        if fuse or interpreter_active() or key in _lora._TUNED:
            config = _pick_config(key, M, run, lambda: _gpu_candidates(M, x.dtype))
        else:
            base = y2.clone()

            def run_scratch(cfg: LoraKernelConfig) -> None:
                y2.copy_(base)
                run(cfg)

            config = _pick_config(key, M, run_scratch, lambda: _gpu_candidates(M, x.dtype))
            y2.copy_(base)
    run(config)
    return y
