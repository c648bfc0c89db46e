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
the epilogue ``acc += b + s * bu + f(z + b_eff) (s Wu)^T`` (``f(z)`` rounded to the input
dtype before the dot, as the unfused low-precision adapter rounds it; ``s`` on the small
up weight, accumulated into the one output tile). ``h`` is never
written to or read back from HBM.

On a GPU the launcher's tuner also times the :data:`autotune.LIBRARY_GEMM` variant:
``h`` by cuBLAS into the output, ``z = h Wd^T`` by cuBLAS (no ``W_eff`` needed), then the
same kernel with ``HAS_GEMM=False`` applies the adapter in place (one extra read of ``h``
for ``z`` and one read and write in the epilogue). It keeps the faster variant per
shape, M bucket and whether ``W_eff`` came cached: a tiled Triton GEMM can trail cuBLAS
by more than those extra passes cost.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .autotune import INTERPRETER_CONFIG, KernelConfig, LibraryGemm, Variant, m_bucket, pick, tiles_and_library
from .runtime import (
    Rows, cdiv, check_interpretable, input_precision, interpreter_active, on_device, output_for, rows_view,
)
from .tiles import ACTIVATIONS, activation, add_bias, gemm_k_loop, row_offsets, tile_offsets

__all__ = ["ACTIVATIONS", "BLOCK_D", "EPILOGUE_CONFIG", "bottleneck_linear_fwd", "bottleneck_down_eff"]

# Chunk of the bottleneck dimension D the epilogue walks.
BLOCK_D = 32

# Tiles of the epilogue-only launch of the library-GEMM variant (no K loop: a
# bandwidth-bound pass over h plus the small up-projection dot).
EPILOGUE_CONFIG = KernelConfig(block_m=64, block_n=128, block_k=16, group_m=8, num_warps=4, num_stages=2)


# Over 60 lines: its grouped argument list (pointers, sizes, strides, constexprs) is a third of it.
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

    ``z = x W_eff^T`` (``(M, D)``) is precomputed. ``HAS_GEMM``: ``acc = x W^T`` over the
    K loop; else ``acc = y`` (``h``, bias included, which the library GEMM wrote; each
    program reads its own tile and overwrites it, so in place is safe). The epilogue
    walks D in chunks of ``BLOCK_D``: ``a = f(z + b_eff)`` (fp32), rounded to the input
    dtype, ``acc += a (s Wu)^T`` (``s Wu`` formed in fp32, rounded to the input dtype);
    then ``acc += s bu`` and ``acc += b``. Rows of ``x``
    holding inf or NaN get a NaN ``z``, as the reference's ``h Wd^T`` gives them.
    """
    pid = tl.program_id(axis=0)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)

    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if HAS_GEMM:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = gemm_k_loop(
            acc, x_ptr, row_offsets(offs_m64, M_INNER, stride_xm0, stride_xm1), mask_m, w_ptr, offs_n, mask_n,
            0, K, stride_xk, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION,
        )
        # A row of x holding inf or NaN makes every column of its h non-finite (it meets
        # every column of W). The reference's z = h Wd^T sums those N values, which gives
        # NaN unless all their signs agree; x W_eff^T, with Wd folded into W first, gives
        # +-inf instead (one inf times each column of W_eff). Give such rows a NaN z, the
        # reference's. Found from the fp32 h tile, so h rounding past fp16's range (a
        # finite x) does not count.
        nonfinite = tl.sum(tl.where(tl.abs(acc) < float("inf"), 0, 1), axis=1)
        row_nan = tl.where(nonfinite > 0, float("nan"), 0.0)
    else:
        acc = tl.load(y_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)

    # Adapter branch, into the same accumulator: s goes on the up weight (fp32, then
    # rounded for the dot), so that no second (BLOCK_M, BLOCK_N) fp32 tile is live (a
    # separate up-projection accumulator doubled the epilogue's registers and spilled on
    # the large tiles). Scaling the small weights, not f(z), keeps f(z) as the unfused
    # branch rounds it.
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        mask_d = (d0 + offs_d) < D
        z_ptrs = z_ptr + offs_m64[:, None] * stride_zm + (d0 + offs_d)[None, :] * stride_zd
        z_tile = tl.load(z_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        b_eff = tl.load(beff_ptr + d0 + offs_d, mask=mask_d, other=0.0)
        z_tile = z_tile + b_eff[None, :]
        if HAS_GEMM:
            z_tile = z_tile + row_nan[:, None]
        a_tile = activation(z_tile, ACTIVATION)
        # Padded columns (d >= D) may hold f(0) != 0; the zeroed Wu^T rows cancel them.
        a_lp = a_tile.to(x_ptr.dtype.element_ty)
        ut_ptrs = up_ptr + offs_n[None, :] * stride_un + (d0 + offs_d)[:, None] * stride_ud
        ut_tile = tl.load(ut_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        ut_scaled = (ut_tile.to(tl.float32) * scaling).to(a_lp.dtype)
        acc = tl.dot(a_lp, ut_scaled, acc, input_precision=INPUT_PRECISION)
    if HAS_UP_BIAS:
        acc = add_bias(acc, upb_ptr, offs_n, mask_n, scaling)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, mask_n)

    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def bottleneck_down_eff(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
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
    config: Optional[Variant] = None,
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
        config: force a variant (a tile config, or ``LIBRARY_GEMM``); default: tuned.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    The GPU tuner times the fused variant (a Triton tile config: ``z = x W_eff^T +
    b_eff``, then one kernel for the GEMM and the epilogue; with ``W_eff`` itself when not
    cached) against ``LIBRARY_GEMM`` (:func:`_run_library`), each with its whole cost.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`runtime.check_interpretable`).
    """
    check_interpretable(x.dtype)
    N, K = weight.shape
    y = output_for(x, N, out)
    rows = rows_view(x)
    M = rows.M
    if M == 0 or N == 0:
        return y
    y2 = y.view(M, N)
    act = ACTIVATIONS[activation]
    # The kernel reads the vectors with unit stride (no copy when they already are).
    bias = None if bias is None else bias.contiguous()
    up_b = None if up_b is None else up_b.contiguous()
    cached = w_eff is not None and b_eff is not None

    def run(variant: Variant) -> None:
        if isinstance(variant, LibraryGemm):
            _run_library(rows, y2, weight, bias, down_w, down_b, up_w, up_b, scaling, act)
            return
        we, be = (w_eff, b_eff) if cached else bottleneck_down_eff(weight, bias, down_w, down_b)
        # x as (M, K): a view except for inputs whose leading dims need three strides.
        z = torch.nn.functional.linear(rows.x.reshape(M, K), we.to(x.dtype))  # skinny (M, D) GEMM
        _launch(variant, rows, y2, weight, bias, z, be.float().contiguous(), up_w, up_b, scaling, act, has_gemm=True)

    with on_device(x):
        if config is None:
            key = ("bottleneck", x.device.index, x.dtype, input_precision(x.dtype), up_w.dtype, N, K,
                   down_w.shape[0], act, bias is None, up_b is None, cached, m_bucket(M))
            config = pick(key, run, lambda: tiles_and_library(M, x.dtype))
        run(config)
    return y


def _run_library(
    rows: Rows,
    y2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float,
    act: int,
) -> None:
    """The library-GEMM variant: ``h = x W^T + b`` by cuBLAS into ``y2``, ``z = h Wd^T``
    (cuBLAS; no ``W_eff`` needed), then the kernel's epilogue alone, in place."""
    x2 = rows.x.reshape(rows.M, weight.shape[1])  # a view unless the rows need three strides
    if bias is None:
        torch.mm(x2, weight.t(), out=y2)
    else:
        torch.addmm(bias, x2, weight.t(), out=y2)
    z = torch.nn.functional.linear(y2, down_w)
    if down_b is not None:
        down_bias = down_b.float().contiguous()
    else:
        down_bias = torch.zeros(down_w.shape[0], device=y2.device, dtype=torch.float32)
    cfg = INTERPRETER_CONFIG if interpreter_active() else EPILOGUE_CONFIG
    _launch(cfg, rows, y2, weight, bias, z, down_bias, up_w, up_b, scaling, act, has_gemm=False)


def _launch(
    cfg: KernelConfig,
    rows: Rows,
    y2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    z: torch.Tensor,
    z_bias: torch.Tensor,
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float,
    act: int,
    *,
    has_gemm: bool,
) -> None:
    """One launch of the kernel with ``cfg``'s tiles: with the GEMM, or (``has_gemm``
    False) the epilogue alone on the ``h`` that ``y2`` already holds."""
    M, N = y2.shape
    K = weight.shape[1]
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _bottleneck_linear_fwd_kernel[grid](
        x_ptr=rows.x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, z_ptr=z, beff_ptr=z_bias,
        up_ptr=up_w, upb_ptr=up_b if up_b is not None else up_w, y_ptr=y2,
        M=M, N=N, K=K, D=z.shape[1], M_INNER=rows.m_inner,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_zm=z.stride(0), stride_zd=z.stride(1),
        stride_un=up_w.stride(0), stride_ud=up_w.stride(1),
        stride_ym=y2.stride(0), stride_yn=y2.stride(1),
        scaling=float(scaling),
        HAS_GEMM=has_gemm,
        HAS_BIAS=has_gemm and bias is not None,
        HAS_UP_BIAS=up_b is not None,
        ACTIVATION=act,
        BLOCK_D=BLOCK_D,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        **cfg.meta,
    )
