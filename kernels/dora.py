"""DoRA's row norms: ``||W + s B A||`` per output row, reading ``W`` once.

Math (PEFT layout, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``)::

    norm[n] = sqrt( sum_k ( W[n, k] + s * sum_j B[n, j] A[j, k] )^2 )

DoRA scales output column ``n`` of the LoRA linear by ``m[n] / norm[n]`` (the fused LoRA
kernels apply that scale in their epilogue: ``lora.py``, ``multi_lora.py``). The norm
needs ``W + s B A``, which is never materialised: each program owns ``BLOCK_N`` rows of
``W``, walks K in ``BLOCK_K`` tiles, rebuilds the tile of ``s B A`` from the rows of ``B``
it holds and a ``(BLOCK_R, BLOCK_K)`` tile of ``A`` (tiny next to ``W``), and accumulates
the squares in fp32. ``W`` is read once in all, in any layout (strides: a GPT-2
``Conv1D`` weight is read through its transposed view).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .runtime import cdiv, check_interpretable, interpreter_active, next_power_of_2, on_device

__all__ = ["dora_weight_norm"]

# (BLOCK_N, BLOCK_K, largest BLOCK_R): small rows tiles give the GPU enough programs for
# the N of one projection (N / 32 of them); the interpreter wants few, small programs.
_GPU_TILES = (32, 128, 32)
_INTERPRETER_TILES = (16, 32, 16)


@triton.jit
def _dora_row_norm_kernel(
    # pointers
    w_ptr, a_ptr, b_ptr, norm_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    # scalars
    scaling,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``norm[n] = ||W[n, :] + s (B A)[n, :]||_2`` for the ``BLOCK_N`` rows of this program.

    Per K tile: ``t = W[n, k] + s * sum_j B[n, j] A[j, k]`` (fp32, ieee dots over rank
    chunks of ``BLOCK_R``; padded ranks and columns read zeros), ``acc[n] += sum_k t^2``.
    Stores ``sqrt(acc)`` in fp32.
    """
    pid = tl.program_id(axis=0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        w_ptrs = w_ptr + offs_n64[:, None] * stride_wn + kk.to(tl.int64)[None, :] * stride_wk
        t = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < R
            b_tile = tl.load(
                b_ptr + offs_n64[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0,
            ).to(tl.float32)
            a_tile = tl.load(
                a_ptr + rr[:, None] * stride_ar + kk[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0,
            ).to(tl.float32)
            t += tl.dot(b_tile * scaling, a_tile, input_precision="ieee")
        acc += tl.sum(t * t, axis=1)
    tl.store(norm_ptr + offs_n, tl.sqrt(acc), mask=mask_n)


def dora_weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the row-norm kernel: ``||W + s B A||`` per row of ``W`` (``(N,)``, fp32).

    Args:
        weight: ``(N, K)``, any strides (a transposed view included), any float dtype.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; any float dtypes (read as fp32).
        scaling: ``s``.
        out: optional preallocated contiguous fp32 ``(N,)`` output.

    Callers validate the shapes (the op layer does); bf16 is refused under the
    interpreter (:func:`runtime.check_interpretable`).
    """
    for t in (weight, lora_A, lora_B):
        check_interpretable(t.dtype)
    N, K = weight.shape
    R = lora_A.shape[0]
    if out is None:
        out = torch.empty(N, device=weight.device, dtype=torch.float32)
    elif out.shape != (N,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({N},)")
    if N == 0:
        return out
    block_n, block_k, max_r = _INTERPRETER_TILES if interpreter_active() else _GPU_TILES
    block_r = max(16, min(max_r, next_power_of_2(R)))
    with on_device(weight):
        _dora_row_norm_kernel[(cdiv(N, block_n),)](
            w_ptr=weight, a_ptr=lora_A, b_ptr=lora_B, norm_ptr=out,
            N=N, K=K, R=R,
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_bn=lora_B.stride(0), stride_br=lora_B.stride(1),
            scaling=float(scaling),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=block_r,
            num_warps=1 if interpreter_active() else 4,
        )
    return out
