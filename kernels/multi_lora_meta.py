"""The plan of a mixed-adapter LoRA launch (:mod:`fastpeft.kernels.multi_lora`).

* :class:`MultiLoraMeta`: which rows use which adapter slot; built once per batch (on the
  device, with no host sync) and shared by every layer;
* :class:`MultiLoraLaunch`: the launch choices (base fused or by cuBLAS, gathered or
  per-segment expand, shrink tiles), with their defaults by M where nothing was timed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .autotune import KernelConfig, gemm_candidates
from .runtime import cdiv, interpreter_active, next_power_of_2

__all__ = [
    "FUSE_BASE_MAX_M",
    "GATHER_MAX_M",
    "MultiLoraLaunch",
    "MultiLoraMeta",
    "block_r_for_dot",
    "expand_candidates",
    "gather_block_r",
    "gpu_split_k",
    "launch_trials",
    "shrink_block_r",
    "shrink_plan",
]


@dataclass(frozen=True)
class MultiLoraMeta:
    """Which rows use which adapter slot: built once per batch, shared by every layer.

    Running example, 5 rows and ``S = 3`` slots::

        row_slot    = [ 2, -1,  0,  2,  0]   # slot of each row in x (-1: base only)
        sorted_rows = [ 2,  4,  0,  3,  1]   # rows ordered by slot, base-only rows last
        sorted_slot = [ 0,  0,  2,  2, -1]   # slot of each sorted position
        seg_end     = [ 2,  2,  4,  4,  5]   # one past the last position of its segment
        slot_rows   = [ 2,  0,  2]           # rows per slot
        slot_start  = [ 0,  2,  2]           # first sorted position of each slot

    Segment of slot 2 = sorted positions ``[slot_start[2], slot_start[2] + slot_rows[2])``
    = ``[2, 4)`` = rows ``{0, 3}``. All tensors are int32 on the batch's device; every
    shape depends only on ``M`` and ``S``, and building them needs no host sync, so the
    metadata can be rebuilt inside a captured CUDA graph.
    """

    row_slot: torch.Tensor
    sorted_rows: torch.Tensor
    sorted_slot: torch.Tensor
    seg_end: torch.Tensor
    slot_rows: torch.Tensor
    slot_start: torch.Tensor
    num_slots: int

    @property
    def num_rows(self) -> int:
        return self.row_slot.shape[0]

    @classmethod
    def build(cls, row_slot: torch.Tensor, num_slots: int) -> "MultiLoraMeta":
        """Metadata for ``row_slot`` (``(M,)`` integers in ``[-1, num_slots)``).

        Values are not range-checked here (that would need a host sync); callers that
        take slots from users check them (``fastpeft.ops_multi`` does).
        """
        if row_slot.dim() != 1:
            raise ValueError(f"row_slot must be 1-D (one slot per row), got shape {tuple(row_slot.shape)}")
        S = int(num_slots)
        dev = row_slot.device
        slot = row_slot.to(torch.int64)
        key = torch.where(slot < 0, torch.full_like(slot, S), slot)  # base-only rows sort last
        sorted_key, order = torch.sort(key, stable=True)
        slots = torch.arange(S, device=dev, dtype=torch.int64)
        start = torch.searchsorted(sorted_key, slots)
        stop = torch.searchsorted(sorted_key, slots, right=True)
        seg_end = torch.searchsorted(sorted_key, sorted_key, right=True)
        sorted_slot = torch.where(sorted_key == S, torch.full_like(sorted_key, -1), sorted_key)
        i32 = torch.int32
        return cls(
            row_slot=slot.to(i32),
            sorted_rows=order.to(i32),
            sorted_slot=sorted_slot.to(i32),
            seg_end=seg_end.to(i32),
            slot_rows=(stop - start).to(i32),
            slot_start=start.to(i32),
            num_slots=S,
        )

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The metadata tensors in the order the op layer passes them."""
        return (self.row_slot, self.sorted_rows, self.sorted_slot, self.seg_end, self.slot_rows, self.slot_start)


@dataclass(frozen=True)
class MultiLoraLaunch:
    """Launch choices beyond the expand tile config (benchmarks and tests force them).

    ``fuse_base``: base GEMM inside the expand kernel (True) or by cuBLAS first (False);
    None: timed both ways on a GPU by the launcher, else by M
    (:data:`FUSE_BASE_MAX_M`). ``gather``: the expand gathers each row's own B chunk
    (True) or walks the tile's segments with one ``tl.dot`` each (False); None: timed on
    a GPU, else by M (:data:`GATHER_MAX_M`). ``split_k``: K splits of the shrink (None:
    by M). ``shrink_block_m``, ``block_r``: shrink row tile and rank chunk (also the
    expand's rank chunk when walking segments; None: :func:`shrink_block_r` of the
    stack's rank for the shrink, 16 for the expand); ``gather_block_r``: the expand's rank
    chunk when gathering (None: by tile size, :func:`gather_block_r`).
    """

    fuse_base: Optional[bool] = None
    gather: Optional[bool] = None
    split_k: Optional[int] = None
    shrink_block_m: Optional[int] = None
    block_r: Optional[int] = None
    gather_block_r: Optional[int] = None


# Largest M for which the base GEMM runs inside the expand kernel when nothing was timed
# (the interpreter, a CUDA-graph capture; on a GPU the launcher times both ways per shape
# and M bucket). Above it, cuBLAS computes the base and the expand
# kernel adds the LoRA terms in place: a plain Triton GEMM trails cuBLAS by 1.2-1.4x at
# large M on Hopper (../shared/anchors/), while the split costs one extra read+write of y.
FUSE_BASE_MAX_M = 64

# Largest M for which the expand gathers each row's B instead of walking segments (the
# default where nothing was timed, as FUSE_BASE_MAX_M). At decode a row tile holds many
# short segments, and the segment walk is a serial chain of dependent loads (slot -> B
# chunk -> dot) per segment; the gather issues one load per rank chunk for the whole
# tile. At prefill segments are long and tl.dot wins. A first guess, unmeasured:
# benchmarks/bench_multi.py times both ("fastpeft_seg"/"_gather").
GATHER_MAX_M = 64

_INTERPRETER_SHRINK_BLOCK_K = 32
# Largest rank chunk of the shrink: the stack's ranks up to it take one pass over x.
MAX_SHRINK_BLOCK_R = 64
# Rank chunk of the segment-walking expand (each chunk one tl.dot on xa and B; x is not re-read).
EXPAND_BLOCK_R = 16


def block_r_for_dot(block_r: int) -> int:
    """A rank chunk that ``tl.dot`` accepts (a power of two, at least 16)."""
    return max(16, next_power_of_2(int(block_r)))


def shrink_block_r(max_rank: int) -> int:
    """Rank chunk of the shrink for a stack padded to ``max_rank``: the shrink reads its
    ``x`` rows once per chunk, so one chunk covers every rank up to
    :data:`MAX_SHRINK_BLOCK_R` (a slot of smaller rank masks the rest: tensor-core work,
    no memory traffic, and the shrink is bound by reading ``x``)."""
    return block_r_for_dot(min(max(int(max_rank), 1), MAX_SHRINK_BLOCK_R))


def gather_block_r(cfg: KernelConfig) -> int:
    """Rank chunk of the gathering expand: the gathered ``(BLOCK_M, BLOCK_N, chunk)`` B
    tile lives in registers, so keep it near 32 values per thread, between 1 and 4 (8
    spilled on the 16x32 tile in fp16; tests/test_compiler_report.py checks every
    gathering tile with ptxas)."""
    budget = 32 * 32 * cfg.num_warps
    br = 4
    while br > 1 and cfg.block_m * cfg.block_n * br > budget:
        br //= 2
    return br


# The gathering expand's row tiles: its gathered B tile sits in registers beside the
# (BLOCK_M, BLOCK_N) accumulator, and 64-row tiles spill on sm_90 even at a rank chunk
# of 1 (128-144 B per thread, ptxas), so it runs on the decode tiles of at most 32 rows.
GATHER_MAX_BLOCK_M = 32
# Tiles of the segment walk with the base left to cuBLAS that spill 4-24 bytes per thread
# on sm_90 (ptxas, benchmarks/compiler_report.py) with xa in that many K splits:
# (block_m, block_n, block_k, num_warps, split_k). Not timed in that case.
_SPILLING_SPLIT_BASE_TILES = {(32, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 128, 64, 4, 1)}


def expand_candidates(
    M: int, dtype: Optional[torch.dtype], fuse: bool, gather: bool, split_k: int
) -> List[KernelConfig]:
    """The expand tiles the tuner times for ``M`` rows of ``dtype`` (None: 16-bit), the
    base fused or not, gathering or walking segments, ``xa`` in ``split_k`` K splits."""
    if gather:
        return [c for c in gemm_candidates(min(M, GATHER_MAX_M), dtype) if c.block_m <= GATHER_MAX_BLOCK_M]
    tiles = gemm_candidates(M, dtype)
    if not fuse:
        tiles = [c for c in tiles
                 if (c.block_m, c.block_n, c.block_k, c.num_warps, split_k) not in _SPILLING_SPLIT_BASE_TILES]
    return tiles


def gpu_split_k(M: int) -> int:
    """K splits of the shrink on a GPU when not forced: few rows give one program per
    (tile, slot), too little work to fill the GPU."""
    return 8 if M <= 64 else (4 if M <= 512 else 1)


def shrink_plan(M: int, K: int, launch: MultiLoraLaunch) -> Tuple[int, int, int]:
    """``(block_m, block_k, split_k)`` of the shrink kernel."""
    interp = interpreter_active()
    block_k = _INTERPRETER_SHRINK_BLOCK_K if interp else 64
    block_m = launch.shrink_block_m or (16 if (interp or M <= 256) else 64)
    if launch.split_k is not None:
        split_k = launch.split_k
    elif interp:
        split_k = 1
    else:
        split_k = gpu_split_k(M)
    split_k = max(1, min(split_k, cdiv(K, block_k)))
    return block_m, block_k, split_k


def launch_trials(launch: MultiLoraLaunch, M: int) -> List[MultiLoraLaunch]:
    """Every combination of ``launch``'s open choices, the choice by M first (what a
    CUDA-graph capture runs untimed)."""
    fuses = [launch.fuse_base] if launch.fuse_base is not None else [M <= FUSE_BASE_MAX_M, M > FUSE_BASE_MAX_M]
    gathers = [launch.gather] if launch.gather is not None else [M <= GATHER_MAX_M, M > GATHER_MAX_M]
    return [dataclasses.replace(launch, fuse_base=f, gather=g) for f in fuses for g in gathers]
