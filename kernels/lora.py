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

Rows of ``x`` are addressed through two strides so that a 3-D input whose leading
dims cannot be flattened without a copy (e.g. a transposed ``(T, B, K)`` view) is read
in place: row ``m`` lives at ``(m // M_INNER) * stride_xm0 + (m % M_INNER) * stride_xm1``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

from . import lora_tma
from .tiles import grouped_tile, lora_dot, lora_expand_from_memory, lora_expand_resident

__all__ = [
    "LoraKernelConfig",
    "lora_linear_fwd",
    "lora_shrink",
    "lora_in_fp32",
    "interpreter_active",
    "check_interpretable",
    "on_device",
    "output_for",
    "rows_view",
]


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU: Triton launches on the *current* CUDA device, which need not
    be the tensors' one (a model spread over GPUs with ``device_map``)."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def capturing() -> bool:
    """True inside a CUDA-graph capture, where timing (it synchronizes) is forbidden."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def interpreter_active() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``).

    Triton reads the flag when ``@triton.jit`` wraps a kernel (at import), so what counts
    is whether this module's kernels became interpreted functions; checking that object
    also keeps the launch path free of environment lookups.
    """
    return not isinstance(_lora_linear_fwd_kernel, JITFunction)


def check_interpretable(dtype: torch.dtype) -> None:
    """Raise when the kernels would compute inputs of ``dtype`` wrong: the Triton
    interpreter's ``tl.dot`` has no bfloat16 (it multiplies the raw bits), so under
    ``TRITON_INTERPRET=1`` a bf16 kernel returns garbage without any error."""
    if dtype == torch.bfloat16 and interpreter_active():
        raise RuntimeError(
            "the Triton kernels cannot run bfloat16 under the Triton interpreter (TRITON_INTERPRET=1): "
            "its tl.dot has no bf16 support and would return wrong numbers. Use backend='auto' or "
            "backend='torch' (the PyTorch reference), fp16/fp32 inputs, or a CUDA GPU without TRITON_INTERPRET"
        )


def lora_in_fp32(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Whether the LoRA branch keeps fp32 range for inputs of ``x_dtype``: adapters kept
    in another dtype than a 16-bit input (PEFT's fp32 adapters on a half model).

    PEFT runs that branch in the adapters' dtype (``lora_B(lora_A(x.to(A.dtype)))``), so
    its ``x A^T`` never rounds to fp16, where it would overflow (``|x A^T| > 65504``)
    although ``y`` is finite. The kernels then keep ``xa`` in fp32 and run the branch's
    dots in tf32 (fp16's 10 mantissa bits, fp32's range; see ``tiles.lora_dot``).
    """
    return x_dtype != torch.float32 and adapter_dtype != x_dtype


def lora_shrink(x2: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T`` (``x2``: ``(M, K)``), the precomputed shrink the epilogue reads: in
    ``x``'s dtype, or in fp32 (``x`` upcast, as PEFT's fp32 branch upcasts it) when
    :func:`lora_in_fp32`."""
    dtype = torch.float32 if lora_in_fp32(x2.dtype, lora_A.dtype) else x2.dtype
    return torch.nn.functional.linear(x2.to(dtype), lora_A.to(dtype))


@triton.jit
def _lora_linear_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, y_ptr,
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
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``y = x W^T + b + s * xa B^T``.

    ``acc = sum_k x[m, k] W[n, k]`` over the K loop (fp32). With ``SHRINK_IN_LOOP`` the
    same loop also accumulates ``xa[m, j] = sum_k x[m, k] A[j, k]`` for ``j < BLOCK_R``
    (``BLOCK_R >= R``); otherwise ``xa`` is read from ``xa_ptr`` in ``BLOCK_R`` chunks.
    Epilogue: ``acc += xa (s B)^T``, ``acc += b``, store in ``y``'s dtype. The branch's
    dots round their operands to the input dtype, as an unfused low-precision LoRA branch
    would, or keep fp32 range with ``LORA_FP32`` (see ``tiles.lora_dot``).

    Split-K (``SPLIT_K > 1``, small M): program ``(tile, k)`` covers K columns
    ``[k * K_PER_SPLIT, (k + 1) * K_PER_SPLIT)`` and writes its fp32 partial sum (no bias)
    to slice ``k`` of ``y_ptr``, then an fp32 ``(SPLIT_K, M, N)`` buffer; the LoRA update
    is linear in ``x``, so each split adds its share of it (in-loop shrink: its partial
    ``xa``; precomputed ``xa``: split 0 adds all of it). ``_splitk_reduce_kernel`` sums
    the slices and adds the bias.
    """
    pid = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # int64 row offsets: M * stride can pass 2^31 on long prefill batches.
    offs_m64 = offs_m.to(tl.int64)
    row_off = (offs_m64 // M_INNER) * stride_xm0 + (offs_m64 % M_INNER) * stride_xm1
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    # int64 too: a transposed x has stride_xk = M, and K * M can pass 2^31.
    x_ptrs = x_ptr + row_off[:, None] + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk
    if SHRINK_IN_LOOP:
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < k_end
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        if SHRINK_IN_LOOP:
            a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < R), other=0.0)
            xa = lora_dot(x_tile, a_tile, xa, x_tile.dtype, LORA_FP32, INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

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

    y_ptrs = y_ptr + pid_k * stride_ps + offs_m64[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
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
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class LoraKernelConfig:
    """Launch parameters of one kernel variant (tile sizes, warps, pipeline stages)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # K split across this many programs per tile, summed by a second small kernel: feeds
    # the GPU at decode, where M fits one row tile and N alone gives too few programs.
    split_k: int = 1
    # Compute ``xa = x A^T`` up front (one skinny GEMM) and only apply it in the
    # epilogue, instead of repeating the shrink in every N tile: wins at large M.
    precompute_xa: bool = False
    # Persistent programs fed by TMA descriptors (kernels/lora_tma.py): Hopper, large M,
    # inputs a descriptor can address (see ``lora_tma.tma_eligible``).
    tma: bool = False


# Fixed config for the CPU interpreter: small tiles keep it fast and exercise masking.
_INTERPRETER_CONFIG = LoraKernelConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)

# Largest padded rank kept in registers by the in-loop shrink; larger ranks use the
# precomputed-xa epilogue, which walks R in chunks of _EPILOGUE_BLOCK_R.
MAX_IN_LOOP_RANK = 64
_EPILOGUE_BLOCK_R = 32


def _sized_for(cands: List[LoraKernelConfig], dtype: Optional[torch.dtype]) -> List[LoraKernelConfig]:
    """The tiles below are sized for 16-bit inputs and Hopper's 227 KiB of shared memory
    per block; 4-byte inputs (fp32, with or without tf32) would double every pipeline
    stage, so their ``block_k`` is halved: each stage holds as many bytes as before."""
    if dtype is None or dtype.itemsize < 4:
        return cands
    halved = [dataclasses.replace(c, block_k=max(16, c.block_k // 2)) for c in cands]
    return list(dict.fromkeys(halved))


def _gpu_candidates(m: int, dtype: Optional[torch.dtype] = None) -> List[LoraKernelConfig]:
    """Candidate configs for the on-GPU tuner, chosen by the M regime, for inputs of
    ``dtype`` (None: 16-bit)."""
    return _sized_for(_gemm_tiles(m), dtype)


def _gemm_tiles(m: int) -> List[LoraKernelConfig]:
    if m <= 16:
        return [
            LoraKernelConfig(16, 64, 128, 8, 4, 4),
            LoraKernelConfig(16, 128, 128, 8, 4, 4),
            LoraKernelConfig(16, 64, 256, 8, 4, 3),
            LoraKernelConfig(16, 32, 256, 8, 4, 4),
        ]
    if m <= 256:
        return [
            LoraKernelConfig(32, 64, 128, 8, 4, 4),
            LoraKernelConfig(64, 64, 64, 8, 4, 4),
            LoraKernelConfig(64, 128, 64, 8, 4, 4),
            LoraKernelConfig(32, 128, 64, 8, 4, 4),
        ]
    return [
        LoraKernelConfig(128, 256, 64, 8, 8, 3),
        LoraKernelConfig(128, 128, 64, 8, 4, 4),
        LoraKernelConfig(128, 128, 64, 8, 8, 4),
        LoraKernelConfig(256, 128, 64, 8, 8, 3),
        LoraKernelConfig(64, 256, 64, 8, 4, 4),
    ]


def _lora_candidates(
    m: int, k: int, lora_in_loop: bool, tma_ok: bool = False, dtype: Optional[torch.dtype] = None
) -> List[LoraKernelConfig]:
    """The LoRA tuner's search space: the GEMM tiles of ``_gpu_candidates``, plus split-K
    tiles at decode, the same tiles with a precomputed ``xa`` at larger M (where the
    shrink could run in the loop), and persistent TMA tiles at large M on Hopper when
    the call is ``tma_ok``; all sized for ``dtype``'s inputs. The tuner times them all
    and keeps the fastest."""
    base = _gemm_tiles(m)
    cands = list(base)
    if m <= 64:
        for split in (2, 4, 8):
            if k >= split * 512:
                cands += [
                    LoraKernelConfig(16, 64, 128, 8, 4, 4, split_k=split),
                    LoraKernelConfig(16, 32, 128, 8, 4, 4, split_k=split),
                ]
    if lora_in_loop and m > 64:
        cands += [dataclasses.replace(c, precompute_xa=True) for c in base]
    if tma_ok and m > _TMA_MIN_M:
        tma = [
            LoraKernelConfig(128, 256, 64, 8, 8, 3, tma=True),
            LoraKernelConfig(128, 128, 64, 8, 4, 4, tma=True),
            LoraKernelConfig(128, 128, 64, 8, 8, 3, tma=True),
        ]
        cands += tma
        if lora_in_loop:
            cands += [dataclasses.replace(c, precompute_xa=True) for c in tma]
    return _sized_for(cands, dtype)


def _m_bucket(m: int) -> int:
    """Power-of-two bucket of M: the tuner's cache key must not grow with every M."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


_TUNED: Dict[Tuple, LoraKernelConfig] = {}


def rows_view(x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int, int, int]:
    """Describe the rows of ``x`` (``(..., K)``) as two row strides, without copying.

    Returns ``(x, M, M_INNER, stride_m0, stride_m1, stride_k)`` where row ``m`` starts at
    ``(m // M_INNER) * stride_m0 + (m % M_INNER) * stride_m1``. Leading dims that merge
    without a copy are merged; only an input whose leading dims need three or more
    strides (a permuted 4-D tensor, say) is copied, since no kernel here takes three.
    """
    K = x.shape[-1]
    if x.is_contiguous():  # the common case, without the general walk over dims below
        M = x.numel() // K if K else math.prod(x.shape[:-1])
        return x, M, max(M, 1), 0, K, 1
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: List[List[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    M = math.prod(x.shape[:-1])
    if len(merged) == 0:
        return x, M, max(M, 1), 0, 0, x.stride(-1)
    if len(merged) == 1:
        return x, M, merged[0][0], 0, merged[0][1], x.stride(-1)
    if len(merged) == 2:
        return x, M, merged[1][0], merged[0][1], merged[1][1], x.stride(-1)
    x2 = x.reshape(M, K)
    return x2, M, max(M, 1), 0, x2.stride(0), x2.stride(1)


def output_for(x: torch.Tensor, N: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """The output of a launcher: ``out`` once checked (contiguous, ``x``'s dtype, shape
    ``(..., N)`` over ``x``'s leading dims), or a new such tensor."""
    shape = (*x.shape[:-1], N)
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    if out.shape != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape}")
    return out


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's own matmul setting, as a drop-in for nn.Linear must."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def _launch(
    cfg: LoraKernelConfig,
    xv: torch.Tensor,
    rows: Tuple[int, int, int, int, int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y: torch.Tensor,
) -> None:
    M, m_inner, s_m0, s_m1, s_k = rows
    N, K = weight.shape
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    R = lora_A.shape[0] if has_lora else 0
    if has_lora and xa is None and cfg.precompute_xa:
        xa = _shrink(xv, rows, lora_A)
    in_loop = has_lora and xa is None
    block_r = max(16, triton.next_power_of_2(R)) if in_loop else _EPILOGUE_BLOCK_R
    lora_fp32 = has_lora and lora_in_fp32(xv.dtype, lora_A.dtype)
    if cfg.tma:
        x2 = _as_2d(xv, rows, K)
        if not lora_tma.tma_eligible(x2, weight, lora_A if has_lora else None, N, in_loop):
            raise ValueError(
                "the TMA kernel needs x and the weights with unit last stride and 16-byte aligned "
                "rows (K and N multiples of 16 bytes); use a config with tma=False for this call"
            )
        lora_tma.lora_linear_tma_launch(
            x2=x2, weight=weight, bias=bias, lora_A=lora_A if has_lora else None,
            lora_B=lora_B if has_lora else None, xa=xa, scaling=scaling, y=y,
            block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k, block_r=block_r,
            group_m=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            lora_fp32=lora_fp32, input_precision=_input_precision(xv.dtype), interpreted=interpreter_active(),
        )
        return
    # Unused pointers still need a tensor; ``weight`` is a safe placeholder.
    a = lora_A if has_lora else weight
    b = lora_B if has_lora else weight
    xa_t = xa if xa is not None else weight
    k_per_split = triton.cdiv(triton.cdiv(K, max(1, cfg.split_k)), cfg.block_k) * cfg.block_k
    split = triton.cdiv(K, k_per_split)  # no split is left without K columns
    # Split-K programs write fp32 partial sums, reduced into ``y`` below.
    out = y if split == 1 else torch.empty((split, M, N), device=y.device, dtype=torch.float32)
    out_strides = (0, y.stride(0), y.stride(1)) if split == 1 else out.stride()
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _lora_linear_fwd_kernel[grid](
        xv, weight, bias if bias is not None else weight, a, b, xa_t, out,
        M, N, K, R, m_inner,
        s_m0, s_m1, s_k,
        weight.stride(0), weight.stride(1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        xa_t.stride(0), xa_t.stride(1),
        out_strides[1], out_strides[2],
        out_strides[0],
        float(scaling), k_per_split,
        HAS_BIAS=bias is not None,
        HAS_LORA=has_lora,
        SHRINK_IN_LOOP=in_loop,
        SPLIT_K=split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=block_r,
        GROUP_M=cfg.group_m,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=_input_precision(xv.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        _reduce_splits(out, bias, y)


_REDUCE_BLOCK_M, _REDUCE_BLOCK_N = 16, 128


def _as_2d(xv: torch.Tensor, rows: Tuple[int, int, int, int, int], K: int) -> Optional[torch.Tensor]:
    """``x`` as an ``(M, K)`` view with one row stride, or None when its rows need two."""
    M, m_inner, s_m0, s_m1, s_k = rows
    if m_inner != M and s_m0 != m_inner * s_m1:
        return None
    # M <= 1 has no row stride of its own: any stride addresses the one row.
    return torch.as_strided(xv, (M, K), (s_m1 if M > 1 else K * s_k, s_k))


# A modest tile that fits every dtype: the plain-GEMM launch of ``_shrink``.
_SHRINK_CONFIG = LoraKernelConfig(64, 64, 64, 8, 4, 3)


def _shrink(xv: torch.Tensor, rows: Tuple[int, int, int, int, int], lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x A^T``, ``(M, r)`` as :func:`lora_shrink` computes it, without copying
    ``x`` where the branch runs in ``x``'s dtype: cuBLAS when the rows have one stride (a
    strided 2-D view), else this module's kernel as a plain GEMM over the two row
    strides (a transposed ``(T, B, K)`` input, say)."""
    M, K = rows[0], lora_A.shape[1]
    x2 = _as_2d(xv, rows, K)
    if x2 is not None:
        return lora_shrink(x2, lora_A)
    if lora_in_fp32(xv.dtype, lora_A.dtype):  # upcast anyway: one copy of the rows
        return lora_shrink(xv.reshape(M, K), lora_A)
    A = lora_A.to(xv.dtype)
    xa = torch.empty((M, A.shape[0]), device=xv.device, dtype=xv.dtype)
    cfg = _INTERPRETER_CONFIG if interpreter_active() else _SHRINK_CONFIG
    _launch(cfg, xv, rows, A, None, None, None, None, 0.0, xa)
    return xa


def _reduce_splits(partial: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> None:
    split, M, N = partial.shape
    grid = (triton.cdiv(M, _REDUCE_BLOCK_M), triton.cdiv(N, _REDUCE_BLOCK_N))
    _splitk_reduce_kernel[grid](
        partial, bias if bias is not None else partial, y,
        M, N,
        partial.stride(0), partial.stride(1), partial.stride(2),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        SPLIT_K=split,
        BLOCK_M=_REDUCE_BLOCK_M,
        BLOCK_N=_REDUCE_BLOCK_N,
        num_warps=4,
    )


def _pick_config(
    key: Tuple,
    m: int,
    run,
    candidates: Callable[[], List[LoraKernelConfig]],
) -> LoraKernelConfig:
    """Config for ``key``: fixed under the interpreter; on a GPU, timed once and cached.

    ``candidates``: builds the list to time (sized for the input dtype, e.g.
    ``_gpu_candidates(m, dtype)``), called on a cache miss only (off the hot path).
    The cache key holds shapes, dtypes, the fp32 matmul precision and the M bucket (never
    data pointers), so the steady-state launch path is one dict lookup.
    """
    if interpreter_active():
        return _INTERPRETER_CONFIG
    cfg = _TUNED.get(key)
    if cfg is None:
        best = None
        configs = candidates()
        if capturing():
            # Timing syncs, which a CUDA-graph capture forbids: take the first (modest)
            # candidate for this capture without caching it; an eager call tunes later.
            return configs[0]
        for cand in configs:
            try:
                t = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20)
            except (OutOfResources, CompilationError):  # does not fit / compile on this card
                continue
            if best is None or t < best[0]:
                best = (t, cand)
        if best is None:
            raise RuntimeError(f"no LoRA kernel config compiles for key {key}")
        cfg = best[1]
        _TUNED[key] = cfg
    return cfg


_TMA_MIN_M = 256
_HAS_TMA: Dict[int, bool] = {}


def _tma_ok(x, xv, rows, weight, lora_A, y2) -> bool:
    """Hopper (or newer) CUDA device and inputs (and output) TMA descriptors can address."""
    if interpreter_active() or not x.is_cuda:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _HAS_TMA:
        _HAS_TMA[index] = torch.cuda.get_device_capability(index)[0] >= 9
    if not _HAS_TMA[index]:
        return False
    if y2.data_ptr() % 16:
        return False
    x2 = _as_2d(xv, rows, weight.shape[1])
    # The in-loop shrink reads A through a descriptor; the precomputed variant does not.
    return lora_tma.tma_eligible(x2, weight, None, weight.shape[0], False) and (
        lora_A is None or lora_tma.tma_eligible(x2, weight, lora_A, weight.shape[0], True)
    )


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    xa: Optional[torch.Tensor] = None,
    config: Optional[LoraKernelConfig] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the fused kernel: ``y = x W^T + b + s * (x A^T) B^T`` (or ``s * xa B^T``).

    Args:
        x: ``(..., K)``, any strides; fp32, fp16 or bf16.
        weight: ``(N, K)`` in ``x``'s dtype. bias: ``(N,)`` or None.
        lora_A: ``(r, K)``; lora_B: ``(N, r)``; both None for the base GEMM alone.
        scaling: ``s``.
        xa: optional precomputed ``x_l A^T`` of shape ``(M, r)`` (M = rows of ``x``), as
            :func:`lora_shrink` computes it: selects the epilogue-only variant (needed
            for dropout, any rank).
        config: force a launch config (benchmarks); default: tuned per shape.
        out: optional preallocated contiguous output of shape ``(..., N)``.

    Returns:
        ``y`` of shape ``(..., N)``, contiguous, in ``x``'s dtype.

    Callers validate shapes and dtypes (the op layer does); this function trusts them,
    but refuses bf16 under the interpreter (:func:`check_interpretable`).
    """
    check_interpretable(x.dtype)
    N, K = weight.shape
    y = output_for(x, N, out)
    xv, M, m_inner, s_m0, s_m1, s_k = rows_view(x)
    if M == 0 or N == 0:
        return y
    rows = (M, m_inner, s_m0, s_m1, s_k)
    if bias is not None:
        bias = bias.contiguous()  # the kernels read it with unit stride
    y2 = y.view(M, N)
    with on_device(x):
        if K == 0:  # empty sums: y = b (x A^T is zero too)
            if bias is None:
                y2.zero_()
            else:
                y2.copy_(bias.expand(M, N))
            return y
        if lora_A is not None and xa is None and lora_A.shape[0] > MAX_IN_LOOP_RANK:
            xa = _shrink(xv, rows, lora_A)

        def run(cfg: LoraKernelConfig) -> None:
            _launch(cfg, xv, rows, weight, bias, lora_A, lora_B, xa, scaling, y2)

        if config is None:
            r = 0 if lora_A is None else lora_A.shape[0]
            in_loop = lora_A is not None and xa is None
            tma_ok = M > _TMA_MIN_M and _tma_ok(x, xv, rows, weight, lora_A, y2)
            # The adapters' dtype changes the kernel's shared memory: part of the key.
            a_dtype = None if lora_A is None else (lora_A.dtype, lora_B.dtype)
            key = (x.device.index, x.dtype, _input_precision(x.dtype), a_dtype, N, K, r, xa is None, bias is None,
                   tma_ok, _m_bucket(M))
            config = _pick_config(key, M, run, lambda: _lora_candidates(M, K, in_loop, tma_ok, x.dtype))
        run(config)
    return y
