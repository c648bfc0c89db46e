"""Building blocks shared by the GEMM-shaped kernels: tile order, LoRA epilogues."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["grouped_tile", "lora_dot", "lora_expand_resident", "lora_expand_from_memory"]


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
def lora_dot(a, b, acc, dtype, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a b`` for the LoRA branch (the shrink ``x A^T`` and the expand ``xa (s B)^T``).

    By default both operands are rounded to ``dtype`` (the input dtype), as the unfused
    low-precision branch rounds them, and the dot runs on 16-bit tensor cores.
    ``LORA_FP32`` (adapters kept in another dtype than a 16-bit input, e.g. PEFT's fp32
    adapters on an fp16 model) keeps the branch in fp32, as PEFT runs it in the adapters'
    dtype: a tf32 dot keeps the 10 mantissa bits fp16 keeps, but fp32's range, so
    ``x A^T`` is never rounded to fp16 (where it could overflow where PEFT does not).
    """
    if LORA_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        return tl.dot(a.to(dtype), b.to(dtype), acc, input_precision=INPUT_PRECISION)


@triton.jit
def lora_expand_resident(
    acc, xa, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, scaling, dtype,
    BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc += xa (s B)^T`` with ``xa`` (``(BLOCK_M, BLOCK_R)``, fp32) in registers.

    The dot rounds its operands as :func:`lora_dot` says (to ``dtype``, the input dtype,
    unless ``LORA_FP32``). ``s`` goes on ``B`` (small weights), not on ``xa``: ``s * xa``
    could overflow fp16 where the reference, which scales after ``B``, does not.
    Ranks ``>= R`` are padding: their ``xa`` lanes hold ``x . 0``, which is NaN for an
    input row holding inf, and ``NaN * 0`` would spread it over the whole row; they are
    zeroed, as ``B``'s padded rows are.
    """
    offs_r = tl.arange(0, BLOCK_R)
    xa = tl.where((offs_r < R)[None, :], xa, 0.0)
    bt_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
    bt_tile = tl.load(bt_ptrs, mask=(offs_r[:, None] < R) & mask_n[None, :], other=0.0)
    bt_scaled = bt_tile.to(tl.float32) * scaling
    return lora_dot(xa, bt_scaled, acc, dtype, LORA_FP32, INPUT_PRECISION)


@triton.jit
def lora_expand_from_memory(
    acc, xa_ptr, b_ptr, offs_m64, offs_n, mask_m, mask_n, R,
    stride_xam, stride_xar, stride_bn, stride_br, scaling, dtype,
    BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``acc += xa (s B)^T`` with ``xa`` (``(M, R)``) read from memory in ``BLOCK_R``
    rank chunks (any rank); operands rounded as :func:`lora_dot` says (``s`` on ``B``:
    see ``lora_expand_resident``)."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        mask_r = (r0 + offs_r) < R
        xa_ptrs = xa_ptr + offs_m64[:, None] * stride_xam + (r0 + offs_r)[None, :] * stride_xar
        xa_tile = tl.load(xa_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        bt_ptrs = b_ptr + offs_n[None, :] * stride_bn + (r0 + offs_r)[:, None] * stride_br
        bt_tile = tl.load(bt_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        bt_scaled = bt_tile.to(tl.float32) * scaling
        acc = lora_dot(xa_tile, bt_scaled, acc, dtype, LORA_FP32, INPUT_PRECISION)
    return acc
