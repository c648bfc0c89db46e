"""Fused bottleneck adapter on a linear layer: one pass over the output ``y``.

Math (``W: (N, K)``, ``b: (N,)``, down ``Wd: (D, N)``, ``bd: (D,)``, up ``Wu: (N, D)``,
``bu: (N,)``, scaling ``s``, non-linearity ``f``)::

    h = x W^T + b                       the sub-layer's output projection
    z = h Wd^T + bd                     down-projection of h
    y = h + s * (f(z) Wu^T + bu)        up-projection and residual

``z`` needs the whole row of ``h`` (all N columns) before ``f`` can be applied, so the
up-projection cannot run in the same tile loop that produces ``h``. Instead the
down-projection is moved in front of the GEMM, using the linearity of ``h`` in ``x``::

    z = x (Wd W)^T + (Wd b + bd) = x W_eff^T + b_eff,     W_eff: (D, K), b_eff: (D,)

``z`` is a skinny ``(M, D)`` GEMM (D/N of the base GEMM's work; ``W_eff`` itself is a
``(D, N) x (N, K)`` product that a frozen-weight caller can compute once). The kernel
here then produces ``y`` tile by tile: the base ``acc = x W^T`` in the K loop, and in
the epilogue ``acc += b + s * bu + s * f(z + b_eff) Wu^T`` (``f(z)`` rounded to the input
dtype before the dot, as the unfused low-precision adapter rounds it). ``h`` is never
written to or read back from HBM.

On a GPU the launcher's tuner also times :data:`LIBRARY_GEMM`: ``h`` by cuBLAS into the
output, ``z = h Wd^T`` by cuBLAS (no ``W_eff`` needed), then the same kernel with
``HAS_GEMM=False`` applies the adapter in place (one extra read of ``h`` for ``z`` and
one read and write in the epilogue). It keeps the faster variant per shape, M bucket
and whether ``W_eff`` came cached: a tiled Triton GEMM can trail cuBLAS by more than
those extra passes cost.

Rows of ``x`` are addressed with the two row strides of ``kernels.lora.rows_view``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .ia3 import LIBRARY_GEMM, _candidates
from .tiles import grouped_tile
from .lora import (
    _INTERPRETER_CONFIG,
    LoraKernelConfig,
    _input_precision,
    _m_bucket,
    _pick_config,
    check_interpretable,
    interpreter_active,
    on_device,
    output_for,
    rows_view,
)

__all__ = ["ACTIVATIONS", "LIBRARY_GEMM", "bottleneck_linear_fwd", "bottleneck_down_eff"]

# Non-linearity name -> constexpr code of the kernel's epilogue.
ACTIVATIONS = {"relu": 0, "gelu": 1, "silu": 2, "swish": 2, "tanh": 3}

_BLOCK_D = 32

# Tiles of the epilogue-only launch of the LIBRARY_GEMM variant (no K loop: a
# bandwidth-bound pass over h plus the small up-projection dot).
_EPILOGUE_CONFIG = LoraKernelConfig(block_m=64, block_n=128, block_k=16, group_m=8, num_warps=4, num_stages=2)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """``f(z)`` in fp32: 0 relu, 1 gelu (exact, erf), 2 silu/swish, 3 tanh. NaN stays
    NaN, as in PyTorch (the hardware max returns the non-NaN operand: relu(NaN) = 0)."""
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


@triton.jit
def _bottleneck_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, z_ptr, beff_ptr, up_ptr, upb_ptr, y_ptr,
    # sizes
    M, N, K, D, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_zm, stride_zd,
    stride_un, stride_ud,
    stride_ym, stride_yn,
    # scalars
    scaling,
    # meta
    HAS_GEMM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x W^T + b + s * (f(z + b_eff) Wu^T + bu)``.

    ``z = x W_eff^T`` (``(M, D)``) is precomputed; the epilogue walks D in chunks of
    ``BLOCK_D``: ``a = f(z + b_eff)`` (fp32), rounded to the input dtype, times ``s``
    folded into the fp32 accumulate as ``acc += s * (a Wu^T)``.
    """
    pid = tl.program_id(axis=0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # int64 row offsets: M * stride can pass 2^31 on long prefill batches.
    offs_m64 = offs_m.to(tl.int64)
    row_off = (offs_m64 // M_INNER) * stride_xm0 + (offs_m64 % M_INNER) * stride_xm1
    x_ptrs = x_ptr + row_off[:, None] + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk

    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if HAS_GEMM:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    else:
        # Epilogue only: ``y`` already holds ``h`` (library GEMM, bias included); each
        # program reads its own tile and overwrites it, so in place is safe.
        acc = tl.load(y_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)

    if HAS_GEMM:
        # A row of x holding inf or NaN makes every column of its h non-finite (it meets
        # every column of W). The reference's z = h Wd^T sums those N values, which gives
        # NaN unless all their signs agree; x W_eff^T, with Wd folded into W first, gives
        # +-inf instead (one inf times each column of W_eff). Give such rows a NaN z, the
        # reference's. Found from the fp32 h tile, so h rounding past fp16's range (a
        # finite x) does not count.
        nonfinite = tl.sum(tl.where(tl.abs(acc) < float("inf"), 0, 1), axis=1)
        row_nan = tl.where(nonfinite > 0, float("nan"), 0.0)
    # Adapter branch: up(f(z + b_eff)), accumulated separately so that s scales it alone.
    up_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = (d0 + offs_d) < D
        z_ptrs = z_ptr + offs_m64[:, None] * stride_zm + (d0 + offs_d)[None, :] * stride_zd
        z_tile = tl.load(z_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        b_eff = tl.load(beff_ptr + d0 + offs_d, mask=mask_d, other=0.0)
        z_tile = z_tile + b_eff[None, :]
        if HAS_GEMM:
            z_tile = z_tile + row_nan[:, None]
        a_tile = _activation(z_tile, ACTIVATION)
        # Padded columns (d >= D) may hold f(0) != 0; the zeroed Wu^T rows cancel them.
        a_lp = a_tile.to(x_ptr.dtype.element_ty)
        ut_ptrs = up_ptr + offs_n[None, :] * stride_un + (d0 + offs_d)[:, None] * stride_ud
        ut_tile = tl.load(ut_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        up_acc = tl.dot(a_lp, ut_tile.to(a_lp.dtype), up_acc, input_precision=INPUT_PRECISION)
    if HAS_UP_BIAS:
        up_b = tl.load(upb_ptr + offs_n, mask=mask_n, other=0.0)
        up_acc += up_b.to(tl.float32)[None, :]
    acc += scaling * up_acc

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def bottleneck_down_eff(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
):
    """``(W_eff, b_eff) = (Wd W, Wd b + bd)``: the down-projection moved in front of the GEMM.

    ``W_eff`` is one GEMM in ``weight``'s dtype (fp32 accumulation inside the GEMM; no
    fp32 copy of ``W``), shape ``(D, K)``; ``b_eff`` is computed and kept in fp32, ``(D,)``.
    """
    wd = down_w.detach()
    w_eff = wd.to(weight.dtype) @ weight.detach()
    b_eff = torch.zeros(wd.shape[0], device=wd.device, dtype=torch.float32)
    if bias is not None:
        b_eff = b_eff + wd.float() @ bias.detach().float()
    if down_b is not None:
        b_eff = b_eff + down_b.detach().float()
    return w_eff, b_eff


def bottleneck_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float,
    activation: str,
    w_eff: Optional[torch.Tensor] = None,
    b_eff: Optional[torch.Tensor] = None,
    config: Optional[LoraKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = h + s * (f(h Wd^T + bd) Wu^T + bu)`` with ``h = x W^T + b``: the bottleneck linear.

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        down_w: ``(D, N)``; down_b: ``(D,)`` or None. up_w: ``(N, D)``; up_b: ``(N,)``
            or None; all in ``x``'s dtype. scaling: ``s``.
        activation: a key of :data:`ACTIVATIONS`.
        w_eff, b_eff: optional :func:`bottleneck_down_eff` of these weights (a cache
            the caller keeps valid); the fused variant computes them when absent.
        config: force a launch config (benchmarks); default: tuned per shape.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Two variants, timed against each other by the GPU tuner (with their whole cost:
    the fused one includes ``z = x W_eff^T`` and, without a cache, ``W_eff`` itself):

    * fused (a Triton tile config): ``z = x W_eff^T + b_eff``, then one kernel for the
      GEMM and the adapter epilogue;
    * :data:`LIBRARY_GEMM`: ``h`` by cuBLAS into ``y``, ``z = h Wd^T`` (cuBLAS), then the
      kernel's epilogue alone in place (``HAS_GEMM=False``).

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (``lora.check_interpretable``).
    """
    check_interpretable(x.dtype)
    N, K = weight.shape
    D = down_w.shape[0]
    y = output_for(x, N, out)
    xv, M, m_inner, s_m0, s_m1, s_k = rows_view(x)
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)
    act = ACTIVATIONS[activation]
    # The kernel reads the vectors with unit stride (no copy when they already are).
    bias = None if bias is None else bias.contiguous()
    up_b = None if up_b is None else up_b.contiguous()
    down_bias = (
        down_b.float().contiguous() if down_b is not None
        else torch.zeros(D, device=x.device, dtype=torch.float32)
    )
    cached = w_eff is not None and b_eff is not None

    def run(cfg: LoraKernelConfig) -> None:
        has_gemm = cfg.block_m != 0
        # x as (M, K): a view except for inputs whose leading dims need three strides.
        x2 = xv.reshape(M, K)
        if has_gemm:
            we, be = (w_eff, b_eff) if cached else bottleneck_down_eff(weight, bias, down_w, down_b)
            z = torch.nn.functional.linear(x2, we.to(x.dtype))  # skinny (M, D) GEMM
            z_bias = be.float().contiguous()
        else:
            if bias is None:
                torch.mm(x2, weight.t(), out=y2)
            else:
                torch.addmm(bias, x2, weight.t(), out=y2)
            z = torch.nn.functional.linear(y2, down_w)
            z_bias = down_bias
            cfg = _INTERPRETER_CONFIG if interpreter_active() else _EPILOGUE_CONFIG
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        _bottleneck_linear_fwd_kernel[grid](
            xv, weight, bias if bias is not None else weight, z, z_bias, up_w,
            up_b if up_b is not None else up_w, y2,
            M, N, K, D, m_inner,
            s_m0, s_m1, s_k,
            weight.stride(0), weight.stride(1),
            z.stride(0), z.stride(1),
            up_w.stride(0), up_w.stride(1),
            y2.stride(0), y2.stride(1),
            float(scaling),
            HAS_GEMM=has_gemm,
            HAS_BIAS=has_gemm and bias is not None,
            HAS_UP_BIAS=up_b is not None,
            ACTIVATION=act,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            BLOCK_D=_BLOCK_D,
            GROUP_M=cfg.group_m,
            INPUT_PRECISION=_input_precision(xv.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    with on_device(x):
        if config is None:
            key = ("bottleneck", x.device.index, x.dtype, _input_precision(x.dtype), up_w.dtype, N, K, D, act, bias is None, up_b is None,
                   cached, _m_bucket(M))
            config = _pick_config(key, M, run, lambda: _candidates(M, x.dtype))
        run(config)
    return y
