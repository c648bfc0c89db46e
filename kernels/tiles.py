"""``@triton.jit`` building blocks shared by the GEMM-shaped kernels.

* tile order: :func:`grouped_tile`, :func:`tile_offsets`;
* prologue: :func:`row_offsets` (rows of ``x`` through two row strides, int64);
* the K loop: :func:`gemm_k_loop` (``x W^T``, optionally with ``x``'s columns scaled) and
  :func:`gemm_shrink_k_loop` (``x W^T`` and ``x A^T`` from the same ``x`` tiles); the
  LoRA branch's dot, in the input dtype or fp32 range: :func:`lora_dot`;
* epilogues: :func:`add_bias`, :func:`scale_columns`, the LoRA expand
  (:func:`lora_expand_chunk`, :func:`lora_expand_resident`, :func:`lora_expand_from_memory`;
  for mixed-adapter batches :func:`lora_expand_gathered`, :func:`lora_expand_segments`,
  over the K splits :func:`sum_splits` of ``xa``) and the non-linearities
  (:data:`ACTIVATIONS`, :func:`activation`).

Every helper is inlined into its caller; they state the math they add to a tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "ACTIVATIONS",
    "activation",
    "add_bias",
    "gemm_k_loop",
    "gemm_shrink_k_loop",
    "grouped_tile",
    "lora_dot",
    "lora_expand_chunk",
    "lora_expand_from_memory",
    "lora_expand_gathered",
    "lora_expand_resident",
    "lora_expand_segments",
    "row_offsets",
    "scale_columns",
    "slot_column_scale",
    "sum_splits",
    "tile_offsets",
]

# The non-linearities the kernels apply, by name (the one list fastpeft accepts): name ->
# the ``ACTIVATION`` constexpr of :func:`activation`. swish is silu.
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "swish": 2, "tanh": 3}


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile index to ``(pid_m, pid_n)`` in grouped order.

    Tiles run down ``GROUP_M`` row-tiles before moving to the next column of tiles, so
    programs that run together share the same ``W`` column panel (and ``x`` rows) in L2.
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(offs_m, offs_n, mask_m, mask_n)``: the rows and columns of output tile ``tile``
    (in :func:`grouped_tile` order) and which of them are in range."""
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def row_offsets(rows, M_INNER, stride_m0, stride_m1):
    """Offsets of rows ``rows`` of a two-stride input:
    ``(m // M_INNER) * stride_m0 + (m % M_INNER) * stride_m1``, in int64 (M * stride can
    pass 2^31 on long prefill batches)."""
    rows64 = rows.to(tl.int64)
    return (rows64 // M_INNER) * stride_m0 + (rows64 % M_INNER) * stride_m1


@triton.jit
def lora_dot(a, b, acc, dtype, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a b`` for the LoRA branch (the shrink ``x A^T`` and the expand ``xa (s B)^T``).

    By default both operands are rounded to ``dtype`` (the input dtype), as the unfused
    low-precision branch rounds them, and the dot runs on 16-bit tensor cores.
    ``LORA_FP32`` (adapters kept in another dtype than a 16-bit input, e.g. PEFT's fp32
    adapters on an fp16 model) keeps the branch in fp32, as PEFT runs it in the adapters'
    dtype: a tf32 dot keeps the 10 mantissa bits fp16 keeps, but fp32's range, so
    ``x A^T`` is never rounded to fp16 (where it could overflow where PEFT does not).
    Operands that are both 16-bit of one dtype (``x`` and a 16-bit copy of ``A`` in the
    shrink) are exact in tf32, so their dot runs natively into the fp32 ``acc``: the same
    sums, without converting tiles to fp32 (which keeps Hopper's MMAs in flight).
    """
    if LORA_FP32:
        if a.dtype == b.dtype and a.dtype != tl.float32:
            return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(dtype), b.to(dtype), acc, input_precision=INPUT_PRECISION)


@triton.jit
def gemm_k_loop(
    acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, k_start, k_end,
    stride_xk, stride_wn, stride_wk,
    BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    l_ptr=None, stride_l=0, SCALE_X: tl.constexpr = False, LORA_FP32: tl.constexpr = False,
):
    """``acc + sum_{k_start <= k < k_end} x[m, k] W[n, k]``, accumulated in fp32.

    ``row_off``: the tile's row offsets in ``x`` (:func:`row_offsets`), ``mask_m`` its
    valid rows; ``offs_n``/``mask_n``: the rows of ``W`` (output columns). The dot is
    :func:`lora_dot`'s: ``W`` tiles cast to ``x``'s dtype (a no-op when they share it), or,
    with ``LORA_FP32`` (``W`` a LoRA factor kept in fp32 on a 16-bit ``x``), both operands
    kept in fp32 range. With ``SCALE_X`` each ``x`` tile is first scaled by ``l[k]`` in
    fp32 and rounded back to ``x``'s dtype (as an unfused ``(x * l).to(x.dtype)`` rounds it).
    """
    offs_k = tl.arange(0, BLOCK_K)
    # int64 k offsets too: a transposed x has stride_xk = M, and K * M can pass 2^31.
    x_ptrs = x_ptr + row_off[:, None] + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk
    if SCALE_X:
        l_ptrs = l_ptr + (k_start + offs_k) * stride_l
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_X:
            l_k = tl.load(l_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            x_tile = (x_tile.to(tl.float32) * l_k[None, :]).to(x_ptr.dtype.element_ty)
            l_ptrs += BLOCK_K * stride_l
        acc = lora_dot(x_tile, w_tile, acc, x_tile.dtype, LORA_FP32, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def gemm_shrink_k_loop(
    acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, a_ptr, R, k_start, k_end,
    stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """:func:`gemm_k_loop` that also accumulates the LoRA shrink from the same ``x`` tiles:
    returns ``(acc + x W^T, xa)`` with ``xa[m, j] = sum_k x[m, k] A[j, k]`` (fp32,
    ``(BLOCK_M, BLOCK_R)``; ranks ``j >= R`` read zeros; the dot is :func:`lora_dot`'s)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + row_off[:, None] + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk
    a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
    xa = tl.zeros((row_off.shape[0], BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
        xa = lora_dot(x_tile, a_tile, xa, x_tile.dtype, LORA_FP32, INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    return acc, xa


@triton.jit
def add_bias(acc, bias_ptr, offs_n, mask_n, scale=1.0):
    """``acc + scale * b[n]``: a vector over the tile's columns (unit stride), added in fp32."""
    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
    return acc + (bias.to(tl.float32) * scale)[None, :]


@triton.jit
def scale_columns(acc, l_ptr, offs_n, mask_n, stride_l):
    """``acc * l[n]``: every column of the tile scaled by its entry of ``l`` (fp32)."""
    l_n = tl.load(l_ptr + offs_n * stride_l, mask=mask_n, other=0.0).to(tl.float32)
    return acc * l_n[None, :]


@triton.jit
def slot_column_scale(mag_ptr, slot_p, offs_n, mask_n, stride_ms):
    """``c[p, n] = mag[slot_p[p], n]`` (fp32; 1 where ``slot_p < 0``): per-row column
    scales gathered from a ``(S, N)`` table by each row's slot (DoRA in mixed batches)."""
    has = slot_p >= 0
    slot_c = tl.where(has, slot_p, 0).to(tl.int64)
    ptrs = mag_ptr + slot_c[:, None] * stride_ms + offs_n[None, :]
    return tl.load(ptrs, mask=has[:, None] & mask_n[None, :], other=1.0).to(tl.float32)


@triton.jit
def lora_expand_chunk(
    acc, xa, b_ptr, offs_n, mask_n, offs_r, mask_r, stride_bn, stride_br, scaling, dtype,
    LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc + xa (s B[:, offs_r])^T`` for one rank chunk ``offs_r`` of ``B`` (``(N, r)``).

    ``s B`` is formed in fp32; the dot rounds both operands as :func:`lora_dot` says (to
    ``dtype``, the input dtype, so that it runs on tensor cores even for fp32 adapters on
    a 16-bit base; or fp32 range with ``LORA_FP32``). ``s`` goes on ``B`` (small
    weights), not on ``xa``: ``s * xa`` could overflow fp16 where the reference, which
    scales after ``B``, does not.
    """
    bt_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
    bt_tile = tl.load(bt_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    bt_scaled = bt_tile.to(tl.float32) * scaling
    return lora_dot(xa, bt_scaled, acc, dtype, LORA_FP32, INPUT_PRECISION)


@triton.jit
def lora_expand_resident(
    acc, xa, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, scaling, dtype,
    BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc + xa (s B)^T`` with ``xa`` (``(BLOCK_M, BLOCK_R)``, fp32) in registers.

    The dot rounds ``xa`` as :func:`lora_dot` says: to ``dtype`` (the input dtype), as the
    unfused low-precision LoRA branch rounds its intermediate ``x A^T``, unless
    ``LORA_FP32``. Ranks ``>= R`` are padding: their ``xa`` lanes hold ``x . 0``, which is
    NaN for an input row holding inf, and ``NaN * 0`` would spread it over the whole row;
    they are zeroed, as ``B``'s padded rows are.
    """
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    xa = tl.where(mask_r[None, :], xa, 0.0)
    return lora_expand_chunk(
        acc, xa, b_ptr, offs_n, mask_n, offs_r, mask_r, stride_bn, stride_br, scaling, dtype,
        LORA_FP32, INPUT_PRECISION,
    )


@triton.jit
def lora_expand_from_memory(
    acc, xa_ptr, b_ptr, offs_m64, offs_n, mask_m, mask_n, R,
    stride_xam, stride_xar, stride_bn, stride_br, scaling, dtype,
    BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc + xa (s B)^T`` with ``xa`` (``(M, R)``) read from memory in ``BLOCK_R`` rank
    chunks (any rank), each dot's operands rounded as :func:`lora_dot` says."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        xa_ptrs = xa_ptr + offs_m64[:, None] * stride_xam + (r0 + offs_r)[None, :] * stride_xar
        xa_tile = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = lora_expand_chunk(
            acc, xa_tile, b_ptr, offs_n, mask_n, r0 + offs_r, mask_r, stride_bn, stride_br, scaling, dtype,
            LORA_FP32, INPUT_PRECISION,
        )
    return acc


@triton.jit
def sum_splits(xa_ptrs, mask, stride_xas, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """``sum_k xa[k]`` over the shrink's K splits (fp32), for one rank chunk of the tile."""
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for sk in range(SPLIT_K):
        xa += tl.load(xa_ptrs + sk * stride_xas, mask=mask, other=0.0)
    return xa


@triton.jit
def lora_expand_gathered(
    acc, dtype, b_ptr, xa_ptr, sorted_slot_ptr, rank_ptr, scaling_ptr,
    offs_p, mask_p, offs_n, mask_n,
    stride_bs, stride_bn, stride_br, stride_xas, stride_xap, stride_xar,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr,
):
    """Mixed-adapter expand: ``acc[p] += s_i (xa[p] B_i^T)`` for each row ``p`` of slot
    ``i = sorted_slot[p]`` (``-1``: nothing), every row gathering its own slot's ``B`` chunk.

    One ``(BLOCK_M, BLOCK_N, BLOCK_R)`` load per rank chunk, reduced on the CUDA cores: no
    serial walk over the tile's segments (decode batches, where a tile holds many short
    segments). Rank chunks run to the tile's largest rank; ``xa`` and ``B`` are rounded to
    ``dtype`` (as the unfused low-precision branch rounds them; kept in fp32 with
    ``LORA_FP32``) and ``s`` is applied in fp32 after the rounding (scaling first could
    overflow fp16 where the reference does not).
    """
    offs_p64 = offs_p.to(tl.int64)
    slot_p = tl.load(sorted_slot_ptr + offs_p, mask=mask_p, other=-1)
    has = slot_p >= 0
    slot_c = tl.where(has, slot_p, 0)
    r_row = tl.load(rank_ptr + slot_c, mask=has, other=0)
    s_row = tl.load(scaling_ptr + slot_c, mask=has, other=0.0)
    r_tile = tl.max(r_row, axis=0)
    b_rows = b_ptr + slot_c.to(tl.int64) * stride_bs
    for r0 in range(0, r_tile, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_xa = rr[None, :] < r_row[:, None]
        xa_ptrs = xa_ptr + offs_p64[:, None] * stride_xap + rr[None, :] * stride_xar
        xa = sum_splits(xa_ptrs, mask_xa, stride_xas, SPLIT_K, BLOCK_M, BLOCK_R)
        bg_ptrs = b_rows[:, None, None] + offs_n[None, :, None] * stride_bn + rr[None, None, :] * stride_br
        bg = tl.load(bg_ptrs, mask=mask_xa[:, None, :] & mask_n[None, :, None], other=0.0)
        if LORA_FP32:
            xa_lp = xa * s_row[:, None]
            bg = bg.to(tl.float32)
        else:
            xa_lp = xa.to(dtype).to(tl.float32) * s_row[:, None]
            bg = bg.to(dtype).to(tl.float32)
        acc += tl.sum(xa_lp[:, None, :] * bg, axis=2)
    return acc


@triton.jit
def lora_expand_segments(
    acc, dtype, b_ptr, xa_ptr, sorted_slot_ptr, seg_end_ptr, rank_ptr, scaling_ptr,
    tile_start, tile_end, offs_p, offs_n, mask_n,
    stride_bs, stride_bn, stride_br, stride_xas, stride_xap, stride_xar,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Mixed-adapter expand: ``acc[p] += xa[p] (s_i B_i)^T`` for each row ``p`` of slot
    ``i = sorted_slot[p]`` (``-1``: nothing), walking the segments ``[p0, p1)`` that overlap the
    tile, one ``tl.dot`` per segment and rank chunk (prefill: few, long segments); ``xa``
    summed over its K splits, each dot's operands rounded as :func:`lora_dot` says."""
    offs_p64 = offs_p.to(tl.int64)
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
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < R
                xa_ptrs = xa_ptr + offs_p64[:, None] * stride_xap + offs_r[None, :] * stride_xar
                xa = sum_splits(xa_ptrs, in_seg[:, None] & mask_r[None, :], stride_xas, SPLIT_K, BLOCK_M, BLOCK_R)
                acc = lora_expand_chunk(
                    acc, xa, b_base, offs_n, mask_n, offs_r, mask_r, stride_bn, stride_br, s, dtype,
                    LORA_FP32, INPUT_PRECISION,
                )
        p = p_end
    return acc


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    """``f(z)`` in fp32 for ``ACTIVATION`` = :data:`ACTIVATIONS` [name]: 0 relu, 1 gelu
    (exact, erf), 2 silu/swish, 3 tanh. NaN stays NaN, as in PyTorch (the hardware max
    returns the non-NaN operand: relu(NaN) = 0)."""
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:
        # sigmoid from exp(-|z|) <= 1: no overflow for large negative z.
        e = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return z * sig
    else:
        # tanh(z) = 2 sigmoid(2z) - 1, written with exp of a non-positive argument so
        # that large |z| saturates to +-1 instead of overflowing.
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z >= 0, t, -t)
