"""Fused (IA)^3 linear forward: the learned scale is applied inside the base GEMM.

Math (PEFT layout, ``W: (N, K)``, ``b: (N,)``)::

    output scaling (attention k/v):   y = (x W^T + b) * l        l: (N,)
    input scaling  (feed-forward):    y = (x * l) W^T + b        l: (K,)

Output scaling is an epilogue: ``acc = sum_k x[m, k] W[n, k]`` (fp32), ``acc += b``,
``acc *= l[n]``, store. Input scaling is a prologue of every K step: the ``x`` tile is
multiplied by ``l[k]`` in fp32 and rounded back to ``x``'s dtype before ``tl.dot`` (as
PEFT's unfused ``(x * l).to(x.dtype)`` rounds it). Neither adds a pass over ``x`` or
``y`` in HBM: ``l`` is one vector read per tile.

On a GPU the launcher's tuner also times the :data:`autotune.LIBRARY_GEMM` variant
(cuBLAS plus one in-place pass) and keeps the faster per shape and M bucket.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import autotune as _autotune
from .autotune import KernelConfig, LibraryGemm, Variant, m_bucket, pick, tiles_and_library
from .runtime import (
    LaunchPlan,
    Rows,
    cdiv,
    check_interpretable,
    input_precision,
    keep_plan,
    matmul_precision,
    on_device,
    output_for,
    rows_view,
)
from .tiles import add_bias, gemm_k_loop, row_offsets, scale_columns, tile_offsets

__all__ = ["ia3_linear_fwd"]

# Call signature -> LaunchPlan (see ia3_linear_fwd).
_PLANS: Dict[tuple, LaunchPlan] = {}


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
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)
    row_off = row_offsets(offs_m64, M_INNER, stride_xm0, stride_xm1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_k_loop(
        acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, 0, K,
        stride_xk, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION,
        l_ptr=l_ptr, stride_l=stride_l, SCALE_X=SCALE_INPUT,
    )
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, mask_n)
    if not SCALE_INPUT:
        acc = scale_columns(acc, l_ptr, offs_n, mask_n, stride_l)

    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def ia3_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    config: Optional[Variant] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel: ``y = (x W^T + b) * l`` or, with ``scale_input``, ``(x * l) W^T + b``.

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        ia3_l: ``N`` entries for output scaling, ``K`` for input scaling (any shape with
            that many entries, e.g. PEFT's ``(N, 1)`` / ``(1, K)``); any float dtype.
        scale_input: the feed-forward (input-scaling) form.
        config: force a variant (a tile config, or ``LIBRARY_GEMM``); default: tuned.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`runtime.check_interpretable`).

    Steady state (no ``config`` or ``out``): a tiled launch's arguments are computed once
    per call signature and replayed (:class:`runtime.LaunchPlan`).
    """
    # PEFT stores l as (N, 1) or (1, K): read it as a 1-D view (no copy for either).
    ia3_l = ia3_l.reshape(-1)
    key = None
    if config is None and out is None:
        key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(),
               None if bias is None else bias.stride(), ia3_l.stride(), ia3_l.dtype, scale_input, matmul_precision())
        plan = _PLANS.get(key)
        if plan is not None and plan.tuned is _autotune.TUNED:
            return plan.launch(x, dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, l_ptr=ia3_l))
    check_interpretable(x.dtype)
    N, K = weight.shape
    if key is not None and bias is not None and bias.stride() != (1,):
        key = None  # a plan passes the bias as given: only a unit-stride one
    bias = None if bias is None else bias.contiguous()  # read with unit stride
    y = output_for(x, N, out)
    rows = rows_view(x)
    M = rows.M
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)

    def run(variant: Variant) -> None:
        if isinstance(variant, LibraryGemm):
            _library_gemm(rows.x.reshape(M, K), weight, bias, ia3_l, scale_input, y2)
        else:
            _launch(variant, rows, weight, bias, ia3_l, scale_input, y2)

    with on_device(x):
        if config is None:
            tune_key = ("ia3", x.device.index, x.dtype, input_precision(x.dtype), ia3_l.dtype, N, K, scale_input,
                        bias is None, m_bucket(M))
            config = pick(tune_key, run, lambda: tiles_and_library(M, x.dtype))
        run(config)
    if key is not None and isinstance(config, KernelConfig) and rows.x is x and K > 0:
        grid, consts = _launch_args(config, rows, weight, bias is not None, ia3_l, scale_input)
        keep_plan(_PLANS, key, LaunchPlan(_autotune.TUNED, _ia3_linear_fwd_kernel, grid, consts, tuple(y.shape), x.is_cuda))
    return y


def _launch(
    cfg: KernelConfig,
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    y2: torch.Tensor,
) -> None:
    grid, consts = _launch_args(cfg, rows, weight, bias is not None, ia3_l, scale_input)
    _ia3_linear_fwd_kernel[grid](
        x_ptr=rows.x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, l_ptr=ia3_l, y_ptr=y2, **consts,
    )


def _launch_args(cfg: KernelConfig, rows: Rows, weight: torch.Tensor, has_bias: bool, ia3_l: torch.Tensor,
                 scale_input: bool):
    """``(grid, keywords)`` of a launch: every keyword but the pointers, from shapes,
    strides and dtypes alone (a contiguous ``(M, N)`` output), so a plan can keep them."""
    M, (N, K) = rows.M, weight.shape
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    consts = dict(
        M=M, N=N, K=K, M_INNER=rows.m_inner,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_l=ia3_l.stride(0),
        stride_ym=N, stride_yn=1,
        HAS_BIAS=has_bias,
        SCALE_INPUT=scale_input,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        **cfg.meta,
    )
    return grid, consts


def _library_gemm(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    y2: torch.Tensor,
) -> None:
    """The library-GEMM variant, written into ``y2`` (``(M, N)``).

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
