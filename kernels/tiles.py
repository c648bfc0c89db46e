"""Tile scheduling shared by the GEMM-shaped kernels."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["grouped_tile"]


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile index to ``(pid_m, pid_n)`` in grouped order.

    Tiles run down ``GROUP_M`` row-tiles before moving to the next column of tiles, so
    programs that run together share the same ``W`` column panel (and ``x`` rows) in L2.
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n
