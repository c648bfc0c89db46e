"""Fused LoRA linear forward, Hopper form: persistent programs fed by TMA descriptors.

Same math as :mod:`fastpeft.kernels.lora`::

    y = x W^T + b + s * (x A^T) B^T        (or  + s * xa B^T  with xa precomputed)

but shaped for large M on sm_90: one program per SM walks the output tiles in grouped
order (``tile = start, start + num_programs, ...``), so launch and tail effects are paid
once, and ``x``, ``W``, ``A`` and ``y`` move through TMA descriptors (bulk async copies
that the compiler pipelines into shared memory; out-of-range boxes read as zeros and
are clipped on store, so no masks are needed on those tensors). ``B``, ``xa`` and the
bias are read with plain masked loads once per tile, in the epilogue.

From one row tile up (``M >= 128``) an ``(M, N)`` grid can hold fewer tiles than the GPU
has SMs; split-K then gives each program a ``(tile, K chunk)`` work unit and the
partial sums go to an fp32 buffer that the caller reduces (``lora._reduce_splits``).

A descriptor needs a unit last stride and 16-byte aligned base and row strides:
:func:`tma_eligible` says whether a call qualifies; the tuner offers this kernel only
then, and the plain kernel handles every other input (odd K, strided rows, ...).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .autotune import KernelConfig
from .runtime import Rows, as_2d, cdiv, interpreter_active, sm_count
from .tiles import add_bias, grouped_tile, lora_dot, lora_expand_from_memory, lora_expand_resident, scale_columns

__all__ = ["tma_eligible", "tma_fits", "tma_stages", "lora_linear_tma_launch"]

# Whether a device (by index, never by data pointers) has TMA (Hopper or newer).
_HAS_TMA: Dict[int, bool] = {}
# Programs of the persistent grid under the interpreter: a few, to exercise the tile loop.
_INTERPRETER_PROGRAMS = 3
# Shared memory a CTA may use on Hopper (227 KiB).
_MAX_SHARED = 232448


# Over 60 lines: its grouped argument list (pointers, sizes, strides, constexprs) is a third of it.
@triton.jit
def _lora_linear_tma_kernel(
    # descriptors and pointers
    x_desc, w_desc, a_desc, y_desc, bias_ptr, b_ptr, xa_ptr, mag_ptr,
    # sizes
    M, N, K, R, num_programs,
    # strides
    stride_bn, stride_br,
    stride_xam, stride_xar,
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
    """Persistent tiles of ``y = x W^T + b + s * xa B^T`` (DoRA, ``HAS_MAG``:
    ``y = c * (x W^T + s * xa B^T) + b``, ``c`` fp32 per column).

    For each tile ``(pid_m, pid_n)``: ``acc = sum_k x[m, k] W[n, k]`` (fp32) over TMA
    boxes of ``x`` and ``W``; with ``SHRINK_IN_LOOP`` the same loop accumulates
    ``xa[m, j] = sum_k x[m, k] A[j, k]`` from TMA boxes of ``A`` (``BLOCK_R >= R`` rows,
    the ones past ``R`` read as zeros), else ``xa`` is read in ``BLOCK_R`` chunks.
    Epilogue: ``acc += xa (s B)^T`` (operands rounded as ``tiles.lora_dot`` says: to the
    input dtype, or fp32 range with ``LORA_FP32``), ``acc += b``, TMA store in ``y``'s dtype.

    Split-K (``SPLIT_K > 1``): work unit ``u`` is tile ``u % tiles`` over K columns
    ``[k * K_PER_SPLIT, (k + 1) * K_PER_SPLIT)``, ``k = u // tiles``; ``y_desc`` then
    addresses an fp32 ``(SPLIT_K, M, N)`` buffer whose slice ``k`` gets the unit's partial
    sum without bias. ``x W^T`` and the in-loop ``xa`` are linear in the K columns, so
    each unit adds its share; a precomputed ``xa`` is added by the ``k = 0`` units only.
    """
    start = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    dtype = x_desc.dtype
    for unit in tl.range(start, num_tiles * SPLIT_K, num_programs, flatten=True):
        tile = unit % num_tiles
        pid_k = unit // num_tiles
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(K, k_start + K_PER_SPLIT)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SHRINK_IN_LOOP:
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            x_tile = x_desc.load([off_m, k0])
            w_tile = w_desc.load([off_n, k0])
            acc = tl.dot(x_tile, w_tile.T, acc, input_precision=INPUT_PRECISION)
            if SHRINK_IN_LOOP:
                a_tile = a_desc.load([0, k0])
                xa = lora_dot(x_tile, a_tile.T, xa, x_tile.dtype, LORA_FP32, INPUT_PRECISION)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if HAS_LORA:
            if SHRINK_IN_LOOP:
                acc = lora_expand_resident(
                    acc, xa, b_ptr, offs_n, mask_n, R, stride_bn, stride_br, scaling, dtype, BLOCK_R, LORA_FP32,
                    INPUT_PRECISION,
                )
            elif pid_k == 0:
                acc = lora_expand_from_memory(
                    acc, xa_ptr, b_ptr, offs_m.to(tl.int64), offs_n, mask_m, mask_n, R,
                    stride_xam, stride_xar, stride_bn, stride_br, scaling, dtype, BLOCK_R, LORA_FP32,
                    INPUT_PRECISION,
                )
        if HAS_MAG:  # per column: distributes over the split-K partial sums
            acc = scale_columns(acc, mag_ptr, offs_n, mask_n, 1)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc = add_bias(acc, bias_ptr, offs_n, mask_n)
            y_desc.store([off_m, off_n], acc.to(dtype))
        else:
            y_desc.store([pid_k, off_m, off_n], acc.reshape(1, BLOCK_M, BLOCK_N))


def _aligned(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit last stride, 16-byte base and rows."""
    es = t.element_size()
    return (
        t.dim() == 2
        and t.stride(1) == 1
        and (t.stride(0) * es) % 16 == 0
        and t.data_ptr() % 16 == 0
        and t.shape[0] > 0
    )


def tma_eligible(
    x2: Optional[torch.Tensor],
    weight: torch.Tensor,
    lora_A: Optional[torch.Tensor],
    n_out: int,
    in_loop: bool,
) -> bool:
    """Whether :func:`lora_linear_tma_launch` can run this call (``x2``: ``x`` as 2-D, or
    None when its rows need two strides). ``A`` needs a descriptor only for the in-loop
    shrink; the output row (``n_out`` elements) must be 16-byte aligned too."""
    if x2 is None or not _aligned(x2) or not _aligned(weight):
        return False
    if (n_out * x2.element_size()) % 16:
        return False
    return not in_loop or lora_A is None or _aligned(lora_A)


def tma_fits(rows: Rows, weight: torch.Tensor, lora_A: Optional[torch.Tensor], y2: torch.Tensor) -> bool:
    """Whether the tuner may offer this kernel: a Hopper (or newer) CUDA device, and inputs
    (and the ``(M, N)`` output ``y2``) TMA descriptors can address."""
    x = rows.x
    if interpreter_active() or not x.is_cuda:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _HAS_TMA:
        _HAS_TMA[index] = torch.cuda.get_device_capability(index)[0] >= 9
    if not _HAS_TMA[index]:
        return False
    if y2.data_ptr() % 16:
        return False
    x2 = as_2d(rows, weight.shape[1])
    # The in-loop shrink reads A through a descriptor; the precomputed variant does not.
    return tma_eligible(x2, weight, None, weight.shape[0], False) and (
        lora_A is None or tma_eligible(x2, weight, lora_A, weight.shape[0], True)
    )


def tma_stages(cfg: KernelConfig, block_r: int, in_loop: bool, x_bytes: int, a_bytes: int) -> int:
    """Pipeline stages to launch ``cfg`` with: its own, or fewer (not under 2) where the
    in-loop shrink's ``A`` boxes would not fit in shared memory with them (a rank-64
    shrink on the widest tile). Shared memory as the sm_90 compile lays it out: per stage
    the ``x``, ``W`` (and ``A``) boxes; once the ``y`` box and, for the in-loop shrink,
    the ``(BLOCK_N, BLOCK_R)`` ``B`` operand of the expand."""
    box = (cfg.block_m + cfg.block_n) * cfg.block_k * x_bytes
    fixed = cfg.block_m * cfg.block_n * x_bytes
    if in_loop:
        box += block_r * cfg.block_k * a_bytes
        fixed += cfg.block_n * block_r * a_bytes
    stages = cfg.num_stages
    while stages > 2 and stages * box + fixed > _MAX_SHARED:
        stages -= 1
    return stages


def _num_programs(device: torch.device, interpreted: bool) -> int:
    return _INTERPRETER_PROGRAMS if interpreted else sm_count(device)


def lora_linear_tma_launch(
    *,
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y: torch.Tensor,
    cfg: KernelConfig,
    block_r: int,
    lora_fp32: bool,
    input_precision: str,
    k_per_split: int = 0,
    mag: Optional[torch.Tensor] = None,
) -> None:
    """Launch the persistent TMA kernel on a ``tma_eligible`` call (``y``: ``(M, N)``,
    contiguous) with ``cfg``'s tiles. ``xa`` given: epilogue-only LoRA; ``lora_A`` None:
    base GEMM only; ``lora_fp32``: the branch keeps fp32 range (``runtime.lora_in_fp32``).
    Split-K: ``y`` is a contiguous fp32 ``(splits, M, N)`` buffer of partial sums (no
    bias), slice ``k`` over K columns ``[k * k_per_split, (k + 1) * k_per_split)``.
    ``mag``: DoRA's column scale (``(N,)`` fp32, contiguous) before the bias."""
    M, K = x2.shape
    N = weight.shape[0]
    split = y.shape[0] if y.dim() == 3 else 1
    has_lora = lora_A is not None and lora_A.shape[0] > 0
    in_loop = has_lora and xa is None
    x_desc = TensorDescriptor.from_tensor(x2, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [cfg.block_n, cfg.block_k])
    y_box = [cfg.block_m, cfg.block_n] if split == 1 else [1, cfg.block_m, cfg.block_n]
    y_desc = TensorDescriptor.from_tensor(y, y_box)
    # Without an in-loop shrink the A descriptor is never read: alias W's.
    a_desc = TensorDescriptor.from_tensor(lora_A, [block_r, cfg.block_k]) if in_loop else w_desc
    # Unused pointers still need a tensor; ``weight`` is a safe placeholder.
    b = lora_B if has_lora else weight
    xa_t = xa if xa is not None else weight
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    programs = min(tiles * split, _num_programs(x2.device, interpreter_active()))
    meta = cfg.meta
    if in_loop:
        stages = tma_stages(cfg, block_r, True, x2.element_size(), lora_A.element_size())
        meta = meta if stages == cfg.num_stages else {**meta, "num_stages": stages}
    _lora_linear_tma_kernel[(programs,)](
        x_desc=x_desc, w_desc=w_desc, a_desc=a_desc, y_desc=y_desc,
        bias_ptr=bias if bias is not None else weight, b_ptr=b, xa_ptr=xa_t,
        mag_ptr=mag if mag is not None else weight,
        M=M, N=N, K=K, R=lora_A.shape[0] if has_lora else 0, num_programs=programs,
        stride_bn=b.stride(0), stride_br=b.stride(1),
        stride_xam=xa_t.stride(0), stride_xar=xa_t.stride(1),
        scaling=float(scaling), K_PER_SPLIT=k_per_split if split > 1 else K,
        HAS_BIAS=bias is not None,
        HAS_MAG=mag is not None,
        HAS_LORA=has_lora,
        SHRINK_IN_LOOP=in_loop,
        SPLIT_K=split,
        BLOCK_R=block_r,
        LORA_FP32=lora_fp32,
        INPUT_PRECISION=input_precision,
        **meta,
    )
