"""Dropout masks that are regenerated, never stored: Philox keyed by a seed and the
element's (row, column).

``keep[m, k] = U(seed; k, m) >= p`` where ``U`` is the first 32-bit word of
``philox(seed, k, m, 0, 0)`` (10 rounds) mapped to ``[0, 1)``. Any kernel that touches
element ``(m, k)`` of an ``(M, K)`` input, whatever its tiling, draws the same keep bit,
so a forward kernel and the backward kernels agree on the mask from one seed (a
one-element int64 tensor drawn from torch's RNG by the caller).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import cdiv, on_device

__all__ = ["dropout_mask", "dropout_tile", "keep_scale"]

_BLOCK_M, _BLOCK_K = 16, 32


def keep_scale(p: float) -> float:
    """``1 / (1 - p)``: what a kept element is multiplied by (1 without dropout)."""
    return 1.0 / (1.0 - p) if p > 0 else 1.0


@triton.jit
def dropout_tile(v, seed_ptr, offs_m, offs_k, p, keep_scale):
    """``keep * v * keep_scale`` (fp32) for the tile of rows ``offs_m`` and columns
    ``offs_k``, ``keep[m, k] = U(seed; k, m) >= p`` (Philox counters ``(k, m, 0, 0)``)."""
    seed = tl.load(seed_ptr)
    c0 = offs_k.to(tl.int32)[None, :] + tl.zeros_like(offs_m).to(tl.int32)[:, None]
    c1 = offs_m.to(tl.int32)[:, None] + tl.zeros_like(offs_k).to(tl.int32)[None, :]
    zero = c0 * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
    u = tl.uint_to_uniform_float(r0)
    return tl.where(u >= p, v.to(tl.float32) * keep_scale, 0.0)


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[m, k] = keep[m, k]`` (int8)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ones = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)
    keep = dropout_tile(ones, seed_ptr, offs_m, offs_k, p, 1.0)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask (bool, ``(M, K)``) that the kernels regenerate from ``seed`` for an
    input of M rows and K columns: for tests, and for a reference given the same mask."""
    out = torch.empty((M, K), device=seed.device, dtype=torch.int8)
    if M and K:
        with on_device(seed):
            _mask_kernel[(cdiv(M, _BLOCK_M), cdiv(K, _BLOCK_K))](
                seed_ptr=seed, out_ptr=out, M=M, K=K, p=float(p), BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K,
            )
    return out.bool()
