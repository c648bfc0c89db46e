"""LoRA input gradient with the dropout mask in the epilogue, one GEMM.

Math (``g = dL/dy`` ``(M, N)``, ``W: (N, K)``, ``A: (r, K)``, ``dS = s g B`` ``(M, r)``
from ``lora_train.lora_grad_shrink``, keep mask regenerated from the forward's seed by
``dropout.dropout_tile``)::

    dX = g W + keep * (dS A) / (1 - p)

The base part runs the shared K loop over ``W`` read as ``W^T`` (strides swapped, no
copy); ``dS A`` is the LoRA epilogue expand into its own accumulator, masked, then
added. Without dropout the forward kernel (``lora.lora_linear_fwd`` over transposed
views) computes the same and this kernel is not needed.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .autotune import KernelConfig, gemm_candidates, m_bucket, pick
from .dropout import dropout_tile, keep_scale
from .runtime import cdiv, check_interpretable, input_precision, lora_in_fp32, on_device
from .tiles import gemm_k_loop, lora_expand_from_memory, tile_offsets

__all__ = ["lora_grad_dx"]


@triton.jit
def _grad_dx_kernel(
    # pointers
    g_ptr, w_ptr, ds_ptr, a_ptr, seed_ptr, dx_ptr,
    # sizes
    M, K, N, R,
    # strides
    stride_gm, stride_gn,
    stride_wn, stride_wk,
    stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    # scalars
    p, keep_scale,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``dX = g W + keep * (dS A) / (1 - p)``
    (``BLOCK_N`` runs over dX's K columns, the K loop over g's N columns).

    The base part is the K loop of ``tiles.gemm_k_loop`` over ``W`` read as ``W^T``
    (strides swapped, no copy); the LoRA part ``dS A`` is the epilogue expand of
    ``tiles.lora_expand_from_memory`` into its own accumulator, masked by the dropout
    keep of the same ``(m, k)`` elements as the forward, then added.
    """
    offs_m, offs_k, mask_m, mask_k = tile_offsets(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # W^T: "output column" k is W's column k, the reduction runs over W's rows n.
    acc = gemm_k_loop(acc, g_ptr, offs_m64 * stride_gm, mask_m, w_ptr, offs_k, mask_k, 0, N,
                      stride_gn, stride_wk, stride_wn, BLOCK_K, INPUT_PRECISION)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lora = lora_expand_from_memory(lora, ds_ptr, a_ptr, offs_m64, offs_k, mask_m, mask_k, R,
                                   stride_dsm, stride_dsr, stride_ak, stride_ar, 1.0, g_ptr.dtype.element_ty,
                                   BLOCK_R, LORA_FP32, INPUT_PRECISION)
    acc += dropout_tile(lora, seed_ptr, offs_m, offs_k, p, keep_scale)
    dx_ptrs = dx_ptr + offs_m64[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def lora_grad_dx(
    g: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, lora_A: torch.Tensor, p: float,
    seed: torch.Tensor, config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """``dX = g W + keep * (dS A) / (1 - p)`` (``(M, K)`` in ``g``'s dtype) in one GEMM,
    the keep mask regenerated from ``seed``. ``g``: ``(M, N)``; ``weight``: ``(N, K)``
    (any strides, read as ``W^T``); ``ds``: ``(M, r)``; ``lora_A``: ``(r, K)``."""
    check_interpretable(g.dtype)
    (M, N), K, R = g.shape, weight.shape[1], lora_A.shape[0]
    dx = torch.empty((M, K), device=g.device, dtype=g.dtype)
    if M == 0 or K == 0:
        return dx
    fp32 = lora_in_fp32(g.dtype, lora_A.dtype)

    def run(cfg: KernelConfig) -> torch.Tensor:
        _grad_dx_kernel[(cdiv(M, cfg.block_m) * cdiv(K, cfg.block_n),)](
            g_ptr=g, w_ptr=weight, ds_ptr=ds, a_ptr=lora_A, seed_ptr=seed, dx_ptr=dx,
            M=M, K=K, N=N, R=R,
            stride_gm=g.stride(0), stride_gn=g.stride(1),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_dsm=ds.stride(0), stride_dsr=ds.stride(1),
            stride_ar=lora_A.stride(0), stride_ak=lora_A.stride(1),
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
            p=float(p), keep_scale=keep_scale(p),
            BLOCK_R=32, LORA_FP32=fp32, INPUT_PRECISION=input_precision(g.dtype),
            **cfg.meta,
        )
        return dx

    with on_device(g):
        key = ("lora_train.dx", g.device.index, g.dtype, lora_A.dtype, input_precision(g.dtype), N, K, R,
               m_bucket(M))
        cfg = config or pick(key, run, lambda: gemm_candidates(M, g.dtype))
        return run(cfg)
