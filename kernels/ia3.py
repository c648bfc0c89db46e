"""Fused (IA)^3 linear forward: the learned scale is applied inside the base GEMM.

Math (PEFT layout, ``W: (N, K)``, ``b: (N,)``)::

    output scaling (attention k/v):   y = (x W^T + b) * l        l: (N,)
    input scaling  (feed-forward):    y = (x * l) W^T + b        l: (K,)

Output scaling is an epilogue: ``acc = sum_k x[m, k] W[n, k]`` (fp32), ``acc += b``,
``acc *= l[n]``, store. Input scaling is a prologue of every K step: the ``x`` tile is
multiplied by ``l[k]`` in fp32 and rounded back to ``x``'s dtype before ``tl.dot`` (as
PEFT's unfused ``(x * l).to(x.dtype)`` rounds it). Neither adds a pass over ``x`` or
``y`` in HBM: ``l`` is one vector read per tile.

On a GPU the launcher's tuner also times :data:`LIBRARY_GEMM` (cuBLAS plus one in-place
pass) and keeps the faster of the two per shape and M bucket.

Rows of ``x`` are addressed with the two row strides of ``kernels.lora.rows_view``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .tiles import grouped_tile
from .lora import (
    LoraKernelConfig,
    _gpu_candidates,
    _input_precision,
    _m_bucket,
    _pick_config,
    check_interpretable,
    on_device,
    output_for,
    rows_view,
)

__all__ = ["ia3_linear_fwd", "LIBRARY_GEMM"]

# Launch "config" that selects the library GEMM (cuBLAS on CUDA) plus one in-place pass:
# ``y *= l`` after the GEMM (output scaling) or ``x * l`` before it (input scaling). The
# GPU tuner times it beside the Triton tiles and keeps whichever is faster for the shape
# (a tiled Triton GEMM can trail cuBLAS by more than the extra pass costs); under the
# interpreter the Triton kernel always runs.
LIBRARY_GEMM = LoraKernelConfig(block_m=0, block_n=0, block_k=0)


@triton.jit
def _ia3_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, l_ptr, y_ptr,
    # sizes
    M, N, K, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_l,
    stride_ym, stride_yn,
    # meta
    HAS_BIAS: tl.constexpr,
    SCALE_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = (x W^T + b) * l`` or ``(x * l) W^T + b``.

    ``SCALE_INPUT`` selects the feed-forward form: ``l`` has K entries and scales the
    ``x`` tile in the K loop; otherwise ``l`` has N entries and scales the epilogue
    (after the bias, as PEFT scales the base layer's full output).
    """
    pid = tl.program_id(axis=0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # int64 row offsets: M * stride can pass 2^31 on long prefill batches.
    offs_m64 = offs_m.to(tl.int64)
    row_off = (offs_m64 // M_INNER) * stride_xm0 + (offs_m64 % M_INNER) * stride_xm1
    x_ptrs = x_ptr + row_off[:, None] + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    l_ptrs = l_ptr + offs_k * stride_l

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_INPUT:
            l_k = tl.load(l_ptrs, mask=mask_k, other=0.0).to(tl.float32)
            x_tile = (x_tile.to(tl.float32) * l_k[None, :]).to(x_ptr.dtype.element_ty)
            l_ptrs += BLOCK_K * stride_l
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if not SCALE_INPUT:
        l_n = tl.load(l_ptr + offs_n * stride_l, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * l_n[None, :]

    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def ia3_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    config: Optional[LoraKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel: ``y = (x W^T + b) * l`` or, with ``scale_input``, ``(x * l) W^T + b``.

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        ia3_l: ``N`` entries for output scaling, ``K`` for input scaling (any shape with
            that many entries, e.g. PEFT's ``(N, 1)`` / ``(1, K)``); any float dtype.
        scale_input: the feed-forward (input-scaling) form.
        config: force a launch config (benchmarks); default: tuned per shape.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (``lora.check_interpretable``).
    """
    check_interpretable(x.dtype)
    N, K = weight.shape
    # PEFT stores l as (N, 1) or (1, K): read it as a 1-D view (no copy for either).
    ia3_l = ia3_l.reshape(-1)
    bias = None if bias is None else bias.contiguous()  # read with unit stride
    y = output_for(x, N, out)
    xv, M, m_inner, s_m0, s_m1, s_k = rows_view(x)
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)

    def run(cfg: LoraKernelConfig) -> None:
        if cfg.block_m == 0:
            _library_gemm(xv.reshape(M, K), weight, bias, ia3_l, scale_input, y2)
            return
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _ia3_linear_fwd_kernel[grid](
            xv, weight, bias if bias is not None else weight, ia3_l, y2,
            M, N, K, m_inner,
            s_m0, s_m1, s_k,
            weight.stride(0), weight.stride(1),
            ia3_l.stride(0),
            y2.stride(0), y2.stride(1),
            HAS_BIAS=bias is not None,
            SCALE_INPUT=scale_input,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            INPUT_PRECISION=_input_precision(xv.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    with on_device(x):
        if config is None:
            key = ("ia3", x.device.index, x.dtype, _input_precision(x.dtype), ia3_l.dtype, N, K, scale_input,
                   bias is None, _m_bucket(M))
            config = _pick_config(key, M, run, lambda: _candidates(M, x.dtype))
        run(config)
    return y


def _candidates(m: int, dtype: Optional[torch.dtype] = None) -> List[LoraKernelConfig]:
    """What the GPU tuner times: the Triton GEMM tiles for this M and dtype, and the library GEMM."""
    return _gpu_candidates(m, dtype) + [LIBRARY_GEMM]


def _library_gemm(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    y2: torch.Tensor,
) -> None:
    """The :data:`LIBRARY_GEMM` variant, written into ``y2`` (``(M, N)``).

    Input scaling scales whichever operand is smaller: ``x * l`` (``M K`` elements) or,
    when ``M > N``, the weight's columns, ``(x * l) W^T = x (W * l)^T`` (``N K``).
    """
    if scale_input:
        lv = ia3_l.to(x2.dtype)
        if x2.shape[0] > weight.shape[0]:
            weight = weight * lv
        else:
            x2 = x2 * lv
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)
    if not scale_input:
        y2.mul_(ia3_l)  # fp32 product, rounded once into y's dtype
