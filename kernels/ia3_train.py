"""(IA)^3 input-scaling backward in one GEMM: ``dx`` and ``dl`` from one pass.

Math (feed-forward form ``y = (x * l) W^T + b``, ``W: (N, K)``, ``l`` of K entries,
rows of ``x`` flattened to ``(M, K)``, ``g = dL/dy`` of shape ``(M, N)``)::

    G  = g W                      (M, K)   the gradient reaching u = x * l
    dx = G * l                    (M, K)   (l broadcast over rows)
    dl = sum_m G[m, :] * x[m, :]  (K,)

The tile of ``G`` stays in registers: its epilogue scales it for ``dx`` and reduces it
against the matching ``x`` tile for ``dl`` (fp32 atomics across row tiles), so neither
``G`` nor an fp32 copy of ``x`` is ever written (the unfused form makes ``G``, an fp32
copy of it, of ``x`` and two products). ``G`` is rounded to ``g``'s dtype before both
uses, as the unfused ``(g @ W).float()`` rounds it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .autotune import KernelConfig, gemm_candidates, m_bucket, pick
from .runtime import cdiv, check_interpretable, input_precision, on_device, rows_view
from .tiles import gemm_k_loop, row_offsets, tile_offsets

__all__ = ["ia3_grad_input_scaling"]


@triton.jit
def _ia3_grad_in_kernel(
    # pointers
    g_ptr, w_ptr, x_ptr, l_ptr, dx_ptr, dl_ptr,
    # sizes
    M, K, N, M_INNER,
    # strides
    stride_gm, stride_gn,
    stride_wn, stride_wk,
    stride_xm0, stride_xm1, stride_xk,
    stride_l,
    stride_dxm, stride_dxk,
    # meta
    NEED_DX: tl.constexpr,
    NEED_DL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``G = g W`` (``BLOCK_N`` over K, the loop over
    N, ``W`` read as ``W^T`` through swapped strides); then ``dx = G * l`` stored and
    ``dl[k] += sum_m G[m, k] x[m, k]`` added atomically."""
    offs_m, offs_k, mask_m, mask_k = tile_offsets(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_k_loop(acc, g_ptr, offs_m64 * stride_gm, mask_m, w_ptr, offs_k, mask_k, 0, N,
                      stride_gn, stride_wk, stride_wn, BLOCK_K, INPUT_PRECISION)
    G = acc.to(g_ptr.dtype.element_ty).to(tl.float32)
    mask = mask_m[:, None] & mask_k[None, :]
    if NEED_DX:
        l_k = tl.load(l_ptr + offs_k * stride_l, mask=mask_k, other=0.0).to(tl.float32)
        dx_ptrs = dx_ptr + offs_m64[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, (G * l_k[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DL:
        row_off = row_offsets(offs_m, M_INNER, stride_xm0, stride_xm1)
        x = tl.load(x_ptr + row_off[:, None] + offs_k.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0)
        tl.atomic_add(dl_ptr + offs_k, tl.sum(G * x.to(tl.float32), axis=0), mask=mask_k)


def ia3_grad_input_scaling(
    g: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, ia3_l: torch.Tensor, need_dx: bool, need_dl: bool,
    config: Optional[KernelConfig] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx, dl)`` of ``y = (x * l) W^T + b``: ``dx`` ``(M, K)`` in ``x``'s dtype,
    ``dl`` ``(K,)`` in fp32 (None for those not needed). ``g``: ``(M, N)``, any 2-D
    strides; ``x``: ``(..., K)``, any strides; ``ia3_l``: K entries, any shape."""
    check_interpretable(g.dtype)
    rows = rows_view(x)
    (M, N), K = g.shape, weight.shape[1]
    l1 = ia3_l.reshape(-1)
    dx = torch.empty((M, K), device=g.device, dtype=x.dtype) if need_dx else None
    dl = torch.zeros(K, device=g.device, dtype=torch.float32) if need_dl else None
    if M == 0 or K == 0 or not (need_dx or need_dl):
        return dx, dl

    def run(cfg: KernelConfig) -> None:
        if dl is not None:
            dl.zero_()  # the tuner repeats the run: the atomics must start from zero
        out = dx if dx is not None else g
        _ia3_grad_in_kernel[(cdiv(M, cfg.block_m) * cdiv(K, cfg.block_n),)](
            g_ptr=g, w_ptr=weight, x_ptr=rows.x, l_ptr=l1, dx_ptr=out, dl_ptr=dl if dl is not None else l1,
            M=M, K=K, N=N, M_INNER=rows.m_inner,
            stride_gm=g.stride(0), stride_gn=g.stride(1),
            stride_wn=weight.stride(0), stride_wk=weight.stride(1),
            stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
            stride_l=l1.stride(0),
            stride_dxm=out.stride(0), stride_dxk=out.stride(1),
            NEED_DX=need_dx, NEED_DL=need_dl,
            INPUT_PRECISION=input_precision(g.dtype),
            **cfg.meta,
        )

    with on_device(g):
        key = ("ia3.grad_in", g.device.index, g.dtype, input_precision(g.dtype), ia3_l.dtype, N, K, need_dx, need_dl,
               m_bucket(M))
        run(config or pick(key, run, lambda: gemm_candidates(M, g.dtype)))
    return dx, dl
