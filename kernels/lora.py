"""Fused LoRA linear forward: base GEMM plus low-rank update in one pass over ``y``.

Math (PEFT layout, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``)::

    y = x W^T + b + s * (x_l A^T) B^T

where ``x_l`` is the LoRA branch's input (``x`` itself, or ``dropout(x)`` in training).

Two ways of getting ``xa = x_l A^T`` into the output tile (on a GPU the tuner times
both, with split-K variants at decode, and keeps the fastest per shape and M bucket):

* ``SHRINK_IN_LOOP``: ``xa`` is accumulated in the same K loop as ``x W^T`` (one launch,
  the x tile is loaded once for both). Best at small M, where the extra
  ``BLOCK_R / BLOCK_N`` tensor-core work per tile is cheap and one launch matters.
* epilogue only: ``xa`` is precomputed (an ``(M, r)`` tensor, tiny next to ``y``) and
  the kernel adds ``s * xa B^T`` in its epilogue. Best at large M (the shrink is not
  repeated in every N tile) and required when the LoRA input differs from ``x``
  (dropout) or the rank is too large for a register-resident ``xa``.

The tuner also times the persistent TMA kernel (:mod:`.lora_tma`, Hopper, ``M >= 128``),
split-K wherever the output tiles leave SMs idle, and the library-GEMM floor
(:data:`autotune.LIBRARY_GEMM`: cuBLAS ``x W^T + b``, then ``y += s (x A^T) B^T`` in
place), so it never keeps a variant slower than the library.

Rows of ``x`` are addressed through two strides (:class:`runtime.Rows`) so that a 3-D
input whose leading dims cannot be flattened without a copy (e.g. a transposed
``(T, B, K)`` view) is read in place.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from . import autotune as _autotune
from . import lora_tma
from .lora_library import library_lora
from .autotune import INTERPRETER_CONFIG, TMA_MIN_M, KernelConfig, LibraryGemm, Variant, lora_variants, m_bucket, pick
from .runtime import (
    Rows,
    as_2d,
    cdiv,
    check_interpretable,
    input_precision,
    interpreter_active,
    k_splits,
    keep_plan,
    matmul_precision,
    lora_in_fp32,
    next_power_of_2,
    on_device,
    output_for,
    rows_view,
    sm_count,
)
from .tiles import (
    add_bias,
    gemm_k_loop,
    gemm_shrink_k_loop,
    lora_expand_from_memory,
    lora_expand_resident,
    row_offsets,
    scale_columns,
    tile_offsets,
)

__all__ = ["MAX_IN_LOOP_RANK", "forget_launch_plans", "lora_linear_fwd", "lora_shrink"]

# Largest padded rank kept in registers by the in-loop shrink; larger ranks use the
# precomputed-xa epilogue, which walks R in chunks of _EPILOGUE_BLOCK_R.
MAX_IN_LOOP_RANK = 64
_EPILOGUE_BLOCK_R = 32
# A modest tile that fits every dtype: the plain-GEMM launch of ``_shrink``.
_SHRINK_CONFIG = KernelConfig(64, 64, 64, 8, 4, 3)
_REDUCE_BLOCK_M, _REDUCE_BLOCK_N = 16, 128


# Over 60 lines: its grouped argument list (pointers, sizes, strides, constexprs) is a third of it.
@triton.jit
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, mag_ptr, y_ptr,
    # sizes
    M, N, K, R, M_INNER,
    # strides
    stride_xm0, stride_xm1, stride_xk,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    stride_xam, stride_xar,
    stride_ym, stride_yn,
    stride_ps,
    # scalars
    scaling, K_PER_SPLIT,
    # meta
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    SHRINK_IN_LOOP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_MAG: tl.constexpr = False,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x W^T + b + s * xa B^T``.

    ``acc = sum_k x[m, k] W[n, k]`` over the K loop (fp32). With ``SHRINK_IN_LOOP`` the
    same loop also accumulates ``xa[m, j] = sum_k x[m, k] A[j, k]`` for ``j < BLOCK_R``
    (``BLOCK_R >= R``); otherwise ``xa`` is read from ``xa_ptr`` in ``BLOCK_R`` chunks.
    Epilogue: ``acc += xa (s B)^T``; with ``HAS_MAG`` (DoRA) each column scaled,
    ``acc *= c[n]`` (``c = m / ||W + s B A||``, fp32, unit stride); ``acc += b``; store
    in ``y``'s dtype. The branch's
    dots round their operands to the input dtype, as an unfused low-precision LoRA branch
    would, or keep fp32 range with ``LORA_FP32`` (see ``tiles.lora_dot``).

    Split-K (``SPLIT_K > 1``, small M): program ``(tile, k)`` covers K columns
    ``[k * K_PER_SPLIT, (k + 1) * K_PER_SPLIT)`` and writes its fp32 partial sum (no bias)
    to slice ``k`` of ``y_ptr``, then an fp32 ``(SPLIT_K, M, N)`` buffer; the LoRA update
    is linear in ``x``, so each split adds its share of it (in-loop shrink: its partial
    ``xa``; precomputed ``xa``: split 0 adds all of it), and the DoRA scale, per column,
    distributes over the sum. ``_splitk_reduce_kernel`` sums the slices and adds the bias.
    """
    pid = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m64 = offs_m.to(tl.int64)
    row_off = row_offsets(offs_m64, M_INNER, stride_xm0, stride_xm1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHRINK_IN_LOOP:
        acc, xa = gemm_shrink_k_loop(
            acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, a_ptr, R, k_start, k_end,
            stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, BLOCK_K, BLOCK_R, LORA_FP32, INPUT_PRECISION,
        )
    else:
        acc = gemm_k_loop(
            acc, x_ptr, row_off, mask_m, w_ptr, offs_n, mask_n, k_start, k_end,
            stride_xk, stride_wn, stride_wk, BLOCK_K, INPUT_PRECISION,
        )

    if HAS_LORA:
        if SHRINK_IN_LOOP:
            acc = lora_expand_resident(
                acc, xa, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, scaling, x_ptr.dtype.element_ty,
                BLOCK_R, LORA_FP32, INPUT_PRECISION,
            )
        elif pid_k == 0:
            acc = lora_expand_from_memory(
                acc, xa_ptr, b_ptr, offs_m64, offs_n, mask_m, mask_n, R,
                stride_xam, stride_xar, stride_bn, stride_br, scaling, x_ptr.dtype.element_ty,
                BLOCK_R, LORA_FP32, INPUT_PRECISION,
            )

    if HAS_MAG:
        acc = scale_columns(acc, mag_ptr, offs_n, mask_n, 1)
    y_ptrs = y_ptr + pid_k * stride_ps + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, offs_n, mask_n)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(
    # pointers
    p_ptr, bias_ptr, y_ptr,
    # sizes
    M, N,
    # strides
    stride_ps, stride_pm, stride_pn,
    stride_ym, stride_yn,
    # meta
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y = sum_k partial[k] + b``: the split-K partial sums (fp32) to ``y``'s dtype."""
    offs_m = tl.program_id(axis=0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(axis=1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(SPLIT_K):
        acc += tl.load(p_ptr + k * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, offs_n, offs_n < N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    xa: Optional[torch.Tensor] = None,
    config: Optional[Variant] = None,
    out: Optional[torch.Tensor] = None,
    lora_A_lowp: Optional[torch.Tensor] = None,
    mag: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel: ``y = x W^T + b + s * (x A^T) B^T`` (or ``s * xa B^T``);
    with ``mag`` (DoRA), ``y = mag * (x W^T + s * (x A^T) B^T) + b``.

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; both None for the base GEMM alone.
        scaling: ``s``.
        xa: optional precomputed ``x_l A^T`` of shape ``(M, r)`` (M = rows of ``x``), as
            :func:`lora_shrink` computes it: selects the epilogue-only variant (needed
            for dropout, any rank).
        config: force a variant (a tile config, or ``LIBRARY_GEMM``; benchmarks);
            default: tuned per shape.
        out: optional preallocated contiguous output of shape ``(..., N)``.
        lora_A_lowp: optional copy of ``lora_A`` in ``x``'s (16-bit) dtype when ``lora_A``
            is fp32 (PEFT's fp32 adapters on a half model): the in-loop shrink reads it,
            so its dot runs on 16-bit tensor cores and keeps MMAs in flight, while ``xa``
            (the fp32 accumulator) and the expand keep fp32 range as with fp32 ``A``. The
            caller keeps it equal to ``lora_A`` rounded, and finite where ``lora_A`` is.
        mag: optional DoRA column scale ``c = m / ||W + s B A||``, ``(N,)`` fp32,
            contiguous, applied in the epilogue before the bias.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`runtime.check_interpretable`).

    Steady state (no ``config``, ``out`` or ``xa``): the launch arguments of a call
    signature (shapes, strides, dtypes, device, tuned variant) are computed once and
    kept (:class:`_TilesPlan`), so a decode step does one dict lookup and the launch.
    """
    if config is None and out is None and xa is None and mag is None and lora_A is not None:
        # What a launch's arguments depend on besides pointers and ``scaling``: shapes,
        # strides, dtypes, device and the fp32 matmul precision (the tl.dot precision).
        key = (
            x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(),
            None if bias is None else bias.stride(), lora_A.shape, lora_A.stride(), lora_A.dtype,
            lora_B.stride(), lora_B.dtype, None if lora_A_lowp is None else (lora_A_lowp.dtype, lora_A_lowp.stride()),
            matmul_precision(),
        )
        plan = _PLANS.get(key)
        if plan is not None and plan.tuned is _autotune.TUNED:
            return plan.run(x, weight, bias, lora_A_lowp if lora_A_lowp is not None else lora_A, lora_B, scaling)
        y = _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, None, None, None, lora_A_lowp, None, key)
        return y
    return _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, xa, config, out, lora_A_lowp, mag, None)


def _lora_linear_fwd(
    x, weight, bias, lora_A, lora_B, scaling, xa, config, out, lora_A_lowp, mag, plan_key
) -> torch.Tensor:
    """:func:`lora_linear_fwd`'s general path; with ``plan_key``, the launch it makes is
    kept as that signature's plan when it can be replayed (a plain tiled launch)."""
    check_interpretable(x.dtype)
    N, K = weight.shape
    y = output_for(x, N, out)
    rows = rows_view(x)
    M = rows.M
    if M == 0 or N == 0:
        return y
    if plan_key is not None and bias is not None and bias.stride() != (1,):
        plan_key = None  # a plan passes the bias as given: only a unit-stride one
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    y2 = y.view(M, N)
    with on_device(x):
        if K == 0:  # empty sums: y = b (x A^T is zero too; the DoRA scale multiplies zero)
            if bias is None:
                y2.zero_()
            else:
                y2.copy_(bias.expand(M, N))
            return y
        if lora_A is not None and xa is None and lora_A.shape[0] > MAX_IN_LOOP_RANK:
            xa = _shrink(rows, lora_A)

        def run(variant: Variant) -> None:
            if isinstance(variant, LibraryGemm):
                if mag is not None:
                    raise ValueError("the library-GEMM variant has no DoRA epilogue; use a Triton variant with mag=")
                _library_gemm(rows, weight, bias, lora_A, lora_B, xa, scaling, y2)
            else:
                _launch(variant, rows, weight, bias, lora_A, lora_B, xa, scaling, y2, lora_A_lowp, mag)

        if config is None:
            config = _tuned_config(x, rows, weight, bias, lora_A, lora_B, xa, y2, run, lora_A_lowp, mag is not None)
        run(config)
        if plan_key is not None:
            _keep_plan(plan_key, config, rows, x, weight, bias, lora_A, lora_B, lora_A_lowp, y)
    return y


def _tuned_config(
    x, rows: Rows, weight, bias, lora_A, lora_B, xa, y2, run, lora_A_lowp=None, has_mag: bool = False
) -> Variant:
    """The tuner's pick for this call (keyed by shapes, dtypes, precision, DoRA scale or
    not, M bucket). A DoRA call (``has_mag``) picks among the Triton variants, whose
    epilogue applies the scale in the same pass (the library GEMM has none)."""
    M, (N, K) = rows.M, weight.shape
    r = 0 if lora_A is None else lora_A.shape[0]
    in_loop = lora_A is not None and xa is None
    tma_ok = M >= TMA_MIN_M and lora_tma.tma_fits(rows, weight, lora_A, y2)
    # The adapters' dtype changes the kernel's shared memory: part of the key (the dtype
    # the shrink reads: a low-precision copy's when one is given).
    a_read = lora_A_lowp if lora_A_lowp is not None and in_loop else lora_A
    a_dtype = None if lora_A is None else (a_read.dtype, lora_B.dtype)
    key = ("lora", x.device.index, x.dtype, input_precision(x.dtype), a_dtype, N, K, r, xa is None, bias is None,
           tma_ok, has_mag, m_bucket(M))

    def variants() -> List[Variant]:
        found = lora_variants(M, K, in_loop, tma_ok, x.dtype, N, _programs(x))
        return [v for v in found if not isinstance(v, LibraryGemm)] if has_mag else found

    return pick(key, run, variants)


def _programs(x: torch.Tensor) -> int:
    """SMs that split-K tries to fill (0 off a GPU: no split-K beyond decode)."""
    return sm_count(x.device) if x.is_cuda else 0


def _library_gemm(
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y2: torch.Tensor,
) -> None:
    """The library-GEMM variant into ``y2`` (:func:`lora_library.library_lora`), with
    ``xa = x A^T`` from :func:`lora_shrink` unless given."""
    M, K = rows.M, weight.shape[1]
    x2 = as_2d(rows, K)
    if x2 is None:  # rows with two strides: the library needs one
        x2 = rows.x.reshape(M, K)
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    if has_lora and xa is None:
        xa = lora_shrink(x2, lora_A)
    library_lora(x2=x2, weight=weight, bias=bias, lora_B=lora_B if has_lora else None, xa=xa, scaling=scaling, y=y2)


def _launch(
    cfg: KernelConfig,
    rows: Rows,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y: torch.Tensor,
    lora_A_lowp: Optional[torch.Tensor] = None,
    mag: Optional[torch.Tensor] = None,
) -> None:
    """One launch of ``cfg``'s variant, written into ``y`` (``(M, N)``); the in-loop
    shrink reads ``lora_A_lowp`` when given (see :func:`lora_linear_fwd`)."""
    if lora_A is not None and lora_A.shape[0] == 0:
        lora_A = lora_B = None  # rank 0: the base GEMM alone
    if lora_A is not None and xa is None and cfg.precompute_xa:
        xa = _shrink(rows, lora_A)
    in_loop = lora_A is not None and xa is None
    block_r = _block_r(lora_A, in_loop)
    # From the fp32 master: xa and the expand keep fp32 range whichever A the shrink reads.
    lora_fp32 = lora_A is not None and lora_in_fp32(rows.x.dtype, lora_A.dtype)
    if in_loop and lora_A_lowp is not None:
        lora_A = lora_A_lowp
    if cfg.tma:
        _launch_tma(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32, mag)
    else:
        _launch_tiles(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32, mag)


def _block_r(lora_A: Optional[torch.Tensor], in_loop: bool) -> int:
    """The rank tile: the padded rank held in registers (in-loop shrink), else the
    epilogue's chunk."""
    return max(16, next_power_of_2(lora_A.shape[0])) if in_loop else _EPILOGUE_BLOCK_R


def _launch_tma(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32, mag=None) -> None:
    """:func:`_launch` on the persistent TMA kernel (its inputs must be descriptor-ready);
    split-K partial sums reduced into ``y`` after (the DoRA scale, per column, distributes
    over them)."""
    M, (N, K) = rows.M, weight.shape
    x2 = as_2d(rows, K)
    if not lora_tma.tma_eligible(x2, weight, lora_A, weight.shape[0], lora_A is not None and xa is None):
        raise ValueError(
            "the TMA kernel needs x and the weights with unit last stride and 16-byte aligned "
            "rows (K and N multiples of 16 bytes); use a config with tma=False for this call"
        )
    k_per_split, split = k_splits(K, cfg.split_k, cfg.block_k)
    out = y if split == 1 else torch.empty((split, M, N), device=y.device, dtype=torch.float32)
    lora_tma.lora_linear_tma_launch(
        x2=x2, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, xa=xa, scaling=scaling, y=out,
        cfg=cfg, block_r=block_r, lora_fp32=lora_fp32, input_precision=input_precision(rows.x.dtype),
        k_per_split=k_per_split, mag=mag,
    )
    if split > 1:
        _reduce_splits(out, bias, y)


def _launch_tiles(cfg, rows, weight, bias, lora_A, lora_B, xa, scaling, y, block_r, lora_fp32, mag=None) -> None:
    """:func:`_launch` on the tiled kernel; split-K partial sums reduced into ``y`` after."""
    M, N = rows.M, weight.shape[0]
    grid, consts, split = _tiles_args(
        cfg, rows, weight, bias is not None, lora_A, lora_B, xa, block_r, lora_fp32, mag is not None
    )
    # Unused pointers still need a tensor; ``weight`` is a safe placeholder.
    a = lora_A if lora_A is not None else weight
    b = lora_B if lora_A is not None else weight
    # Split-K programs write fp32 partial sums, reduced into ``y`` below.
    out = y if split == 1 else torch.empty((split, M, N), device=y.device, dtype=torch.float32)
    _lora_linear_fwd_kernel[grid](
        x_ptr=rows.x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, a_ptr=a, b_ptr=b,
        xa_ptr=xa if xa is not None else weight, mag_ptr=mag if mag is not None else weight, y_ptr=out,
        scaling=float(scaling), **consts,
    )
    if split > 1:
        _reduce_splits(out, bias, y)


def _tiles_args(
    cfg, rows: Rows, weight, has_bias: bool, lora_A, lora_B, xa, block_r: int, lora_fp32: bool, has_mag: bool = False
):
    """``(grid, keywords, splits)`` of a tiled launch: every keyword but the pointers and
    ``scaling``, from shapes, strides and dtypes alone (so a plan can keep them)."""
    M, (N, K) = rows.M, weight.shape
    a = lora_A if lora_A is not None else weight
    b = lora_B if lora_A is not None else weight
    xa_t = xa if xa is not None else weight
    k_per_split, split = k_splits(K, cfg.split_k, cfg.block_k)
    stride_ps, stride_ym, stride_yn = (0, N, 1) if split == 1 else (M * N, N, 1)
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n), split)
    consts = dict(
        M=M, N=N, K=K, R=lora_A.shape[0] if lora_A is not None else 0, M_INNER=rows.m_inner,
        stride_xm0=rows.stride_m0, stride_xm1=rows.stride_m1, stride_xk=rows.stride_k,
        stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_bn=b.stride(0), stride_br=b.stride(1),
        stride_xam=xa_t.stride(0), stride_xar=xa_t.stride(1),
        stride_ym=stride_ym, stride_yn=stride_yn, stride_ps=stride_ps,
        K_PER_SPLIT=k_per_split,
        HAS_BIAS=has_bias,
        HAS_LORA=lora_A is not None,
        HAS_MAG=has_mag,
        SHRINK_IN_LOOP=lora_A is not None and xa is None,
        SPLIT_K=split,
        BLOCK_R=block_r,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=input_precision(rows.x.dtype),
        **cfg.meta,
    )
    return grid, consts, split


# --------------------------------------------------------------------------- launch plans

# Call signature -> plan (bounded: ``runtime.keep_plan``).
_PLANS: Dict[tuple, "_TilesPlan"] = {}


def forget_launch_plans() -> None:
    """Drop every kept launch plan: the next call of each signature goes through the
    tuner again (benchmarks that report the tuner's pick; tests)."""
    _PLANS.clear()


class _TilesPlan:
    """A tiled launch of one call signature, its keywords precomputed: replayed for
    any call with that signature (new pointers and ``scaling``). ``tuned``: the tuner
    table it was picked from (a replaced table retunes)."""

    __slots__ = ("tuned", "grid", "consts", "y_shape", "split", "device_switch")

    def __init__(self, tuned, grid, consts, y_shape, split, device_switch) -> None:
        self.tuned, self.grid, self.consts, self.y_shape = tuned, grid, consts, y_shape
        self.split, self.device_switch = split, device_switch

    def run(self, x, weight, bias, a, lora_B, scaling) -> torch.Tensor:
        y = torch.empty(self.y_shape, device=x.device, dtype=x.dtype)
        out = y if self.split == 1 else torch.empty(
            (self.split, self.consts["M"], self.consts["N"]), device=x.device, dtype=torch.float32
        )
        if self.device_switch:
            with on_device(x):
                self._launch(x, weight, bias, a, lora_B, scaling, y, out)
        else:
            self._launch(x, weight, bias, a, lora_B, scaling, y, out)
        return y

    def _launch(self, x, weight, bias, a, lora_B, scaling, y, out) -> None:
        # ``kernel.run`` is what ``kernel[grid](...)`` calls, without the lambda between.
        _lora_linear_fwd_kernel.run(
            x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, a_ptr=a, b_ptr=lora_B,
            xa_ptr=weight, mag_ptr=weight, y_ptr=out, scaling=float(scaling), grid=self.grid, warmup=False,
            **self.consts,
        )
        if self.split > 1:
            _reduce_splits(out, bias, y.view(self.consts["M"], self.consts["N"]))


def _keep_plan(key, cfg, rows: Rows, x, weight, bias, lora_A, lora_B, lora_A_lowp, y) -> None:
    """Keep the launch just made as ``key``'s plan when it is a plain tiled launch that
    replays from the signature alone (not TMA, no precomputed ``xa``, no copy of ``x``,
    a real rank and size, the tuner's own choice), else nothing."""
    K, R = weight.shape[1], lora_A.shape[0]
    if (
        not isinstance(cfg, KernelConfig) or cfg.tma or cfg.precompute_xa or rows.x is not x
        or K == 0 or R == 0 or R > MAX_IN_LOOP_RANK
    ):
        return
    a = lora_A_lowp if lora_A_lowp is not None else lora_A
    lora_fp32 = lora_in_fp32(x.dtype, lora_A.dtype)
    grid, consts, split = _tiles_args(cfg, rows, weight, bias is not None, a, lora_B, None, _block_r(a, True), lora_fp32)
    keep_plan(_PLANS, key, _TilesPlan(_autotune.TUNED, grid, consts, tuple(y.shape), split, x.is_cuda))


def lora_shrink(x2: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T`` (``x2``: ``(M, K)``), the precomputed shrink the epilogue reads: in
    ``x``'s dtype, or in fp32 (``x`` upcast, as PEFT's fp32 branch upcasts it) when
    :func:`runtime.lora_in_fp32`."""
    dtype = torch.float32 if lora_in_fp32(x2.dtype, lora_A.dtype) else x2.dtype
    return torch.nn.functional.linear(x2.to(dtype), lora_A.to(dtype))


def _shrink(rows: Rows, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T``, ``(M, r)`` as :func:`lora_shrink` computes it, without copying
    ``x`` where the branch runs in ``x``'s dtype: cuBLAS when the rows have one stride (a
    strided 2-D view), else this module's kernel as a plain GEMM over the two row
    strides (a transposed ``(T, B, K)`` input, say)."""
    M, K = rows.M, lora_A.shape[1]
    x2 = as_2d(rows, K)
    if x2 is not None:
        return lora_shrink(x2, lora_A)
    if lora_in_fp32(rows.x.dtype, lora_A.dtype):  # upcast anyway: one copy of the rows
        return lora_shrink(rows.x.reshape(M, K), lora_A)
    A = lora_A.to(rows.x.dtype)
    xa = torch.empty((rows.M, A.shape[0]), device=rows.x.device, dtype=rows.x.dtype)
    cfg = INTERPRETER_CONFIG if interpreter_active() else _SHRINK_CONFIG
    _launch(cfg, rows, A, None, None, None, None, 0.0, xa)
    return xa


def _reduce_splits(partial: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
    split, M, N = partial.shape
    grid = (cdiv(M, _REDUCE_BLOCK_M), cdiv(N, _REDUCE_BLOCK_N))
    _splitk_reduce_kernel[grid](
        p_ptr=partial, bias_ptr=bias if bias is not None else partial, y_ptr=y,
        M=M, N=N,
        stride_ps=partial.stride(0), stride_pm=partial.stride(1), stride_pn=partial.stride(2),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=_REDUCE_BLOCK_M,
        BLOCK_N=_REDUCE_BLOCK_N,
        num_warps=4,
    )
