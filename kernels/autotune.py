"""Tile configs, kernel variants and the one tuner every launcher uses.

A launcher runs one *variant* per call: a Triton tile config (:class:`KernelConfig`),
the library GEMM plus the op's own pass (:data:`LIBRARY_GEMM`), or, for mixed-adapter
batches, a launch plan of its own. Which one is picked by :func:`pick`:

* under the Triton interpreter: a fixed variant (:data:`INTERPRETER_CONFIG` for tiles:
  small, so that the interpreter stays fast and the tests exercise masking);
* on a GPU: every candidate is timed once per key (shapes, dtypes, ``tl.dot`` precision,
  M bucket; never data pointers) and the fastest is kept, so that the steady-state launch
  path is one dict lookup; the pick is also written to disk (:mod:`.tuning_cache`) and a
  later process on the same card and Triton version reads it instead of timing again;
* inside a CUDA-graph capture, where timing is forbidden: the pick on disk if there is
  one, else the first (modest) candidate, not cached, so that an eager call tunes later.

A tuner key is ``(kernel name, device index, *parts)``: the file replaces the index by the
device's name.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, TypeVar, Union

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from . import tuning_cache
from .runtime import capturing, interpreter_active

__all__ = [
    "INTERPRETER_CONFIG",
    "LIBRARY_GEMM",
    "TMA_MIN_M",
    "TUNED",
    "KernelConfig",
    "LibraryGemm",
    "Variant",
    "gemm_candidates",
    "gemm_tiles",
    "lora_candidates",
    "lora_variants",
    "m_bucket",
    "pick",
    "sized_for",
    "tiles_and_library",
    "time_variant",
    "will_time",
]


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one tiled kernel variant (tile sizes, warps, pipeline stages)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # K split across this many programs per tile, summed by a second small kernel: feeds
    # the GPU at decode, where M fits one row tile and N alone gives too few programs.
    split_k: int = 1
    # LoRA: compute ``xa = x A^T`` up front (one skinny GEMM) and only apply it in the
    # epilogue, instead of repeating the shrink in every N tile: wins at large M.
    precompute_xa: bool = False
    # LoRA: persistent programs fed by TMA descriptors (kernels/lora_tma.py): Hopper,
    # large M, inputs a descriptor can address (see ``lora_tma.tma_eligible``).
    tma: bool = False

    @functools.cached_property
    def meta(self) -> Dict[str, int]:
        """The launch keywords of these tiles: the ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` and
        ``GROUP_M`` constexprs, ``num_warps`` and ``num_stages`` (built once per config)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class LibraryGemm:
    """Variant: the library GEMM (cuBLAS on CUDA) for ``x W^T``, then the op's own pass
    (an in-place scale, or an epilogue-only kernel). A tiled Triton GEMM can trail cuBLAS
    by more than that extra pass costs, so the tuner times it beside the tiles."""


LIBRARY_GEMM = LibraryGemm()
Variant = Union[KernelConfig, LibraryGemm]

# Fixed config for the CPU interpreter: small tiles keep it fast and exercise masking.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)

# Smallest M for which the persistent 128-row TMA tiles are candidates: one row tile.
TMA_MIN_M = 128
# Split-K factors the tuner tries; a split needs at least this many K columns per program.
_SPLITS = (2, 4, 8)
_MIN_K_PER_SPLIT = 512


# --------------------------------------------------------------------------- candidates


def sized_for(cands: List[KernelConfig], dtype: Optional[torch.dtype]) -> List[KernelConfig]:
    """The tiles here are sized for 16-bit inputs and Hopper's 227 KiB of shared memory
    per block; 4-byte inputs (fp32, with or without tf32) would double every pipeline
    stage, so their ``block_k`` is halved: each stage holds as many bytes as before."""
    if dtype is None or dtype.itemsize < 4:
        return cands
    halved = [dataclasses.replace(c, block_k=max(16, c.block_k // 2)) for c in cands]
    return list(dict.fromkeys(halved))


def gemm_tiles(m: int) -> List[KernelConfig]:
    """The GEMM tiles for the M regime (decode, small batch, prefill), for 16-bit inputs."""
    if m <= 16:
        return [
            KernelConfig(16, 64, 128, 8, 4, 4),
            KernelConfig(16, 128, 128, 8, 4, 4),
            KernelConfig(16, 64, 256, 8, 4, 3),
            KernelConfig(16, 32, 256, 8, 4, 4),
        ]
    if m <= 256:
        return [
            KernelConfig(32, 64, 128, 8, 4, 4),
            KernelConfig(64, 64, 64, 8, 4, 4),
            KernelConfig(64, 128, 64, 8, 4, 4),
            KernelConfig(32, 128, 64, 8, 4, 4),
        ]
    return [
        KernelConfig(128, 256, 64, 8, 8, 3),
        KernelConfig(128, 128, 64, 8, 4, 4),
        KernelConfig(128, 128, 64, 8, 8, 4),
        KernelConfig(256, 128, 64, 8, 8, 3),
        KernelConfig(64, 256, 64, 8, 4, 4),
    ]


def gemm_candidates(m: int, dtype: Optional[torch.dtype] = None) -> List[KernelConfig]:
    """The GEMM tiles for ``m``, sized for inputs of ``dtype`` (None: 16-bit)."""
    return sized_for(gemm_tiles(m), dtype)


def tiles_and_library(m: int, dtype: Optional[torch.dtype] = None) -> List[Variant]:
    """The (IA)^3 and bottleneck search space: the GEMM tiles and the library GEMM."""
    return gemm_candidates(m, dtype) + [LIBRARY_GEMM]


def lora_candidates(
    m: int,
    k: int,
    lora_in_loop: bool,
    tma_ok: bool = False,
    dtype: Optional[torch.dtype] = None,
    n: int = 0,
    programs: int = 0,
) -> List[KernelConfig]:
    """The LoRA tile search space: the GEMM tiles, plus split-K tiles at decode, the same
    tiles with a precomputed ``xa`` at larger M (where the shrink could run in the loop),
    and persistent 128-row TMA tiles from ``M >= TMA_MIN_M`` on Hopper when the call is
    ``tma_ok``; all sized for ``dtype``'s inputs.

    Given the output width ``n`` and the GPU's ``programs`` (SMs), every tile (TMA ones
    included) that leaves SMs idle (fewer ``(M, N)`` tiles than SMs) also gets split-K
    variants: K cut in 2, 4 or 8 so that ``tiles * split`` reaches the SMs without
    exceeding twice their number."""
    base = gemm_tiles(m)
    cands = list(base)
    if m <= 64:
        for split in _SPLITS:
            if k >= split * _MIN_K_PER_SPLIT:
                cands += [
                    KernelConfig(16, 64, 128, 8, 4, 4, split_k=split),
                    KernelConfig(16, 32, 128, 8, 4, 4, split_k=split),
                ]
    elif n and programs:
        cands += _split_k(base, m, n, k, programs)
    if lora_in_loop and m > 64:
        cands += [dataclasses.replace(c, precompute_xa=True) for c in base]
    if tma_ok and m >= TMA_MIN_M:
        tma = [
            KernelConfig(128, 256, 64, 8, 8, 3, tma=True),
            KernelConfig(128, 128, 64, 8, 4, 4, tma=True),
            KernelConfig(128, 128, 64, 8, 8, 3, tma=True),
        ]
        cands += tma
        if lora_in_loop:
            cands += [dataclasses.replace(c, precompute_xa=True) for c in tma]
        if n and programs:  # fp32 partial boxes of a 256-wide tile overflow shared memory
            cands += _split_k([c for c in tma if c.block_n <= 128], m, n, k, programs)
    return sized_for(cands, dtype)


def _split_k(tiles: List[KernelConfig], m: int, n: int, k: int, programs: int) -> List[KernelConfig]:
    """Split-K copies of the ``tiles`` whose ``(m, n)`` grid leaves some of the GPU's
    ``programs`` idle (see :func:`lora_candidates`)."""
    out = []
    for c in tiles:
        count = -(-m // c.block_m) * -(-n // c.block_n)
        for split in _SPLITS:
            if count < programs and count * split <= 2 * programs and k >= split * _MIN_K_PER_SPLIT:
                out.append(dataclasses.replace(c, split_k=split))
    return out


def lora_variants(
    m: int, k: int, lora_in_loop: bool, tma_ok: bool, dtype: Optional[torch.dtype], n: int, programs: int
) -> List[Variant]:
    """What the LoRA tuner times: :func:`lora_candidates` and the library-GEMM floor
    (cuBLAS ``x W^T + b``, then ``y += s (x A^T) B^T`` in place), so that it never keeps a
    tile slower than the library."""
    return lora_candidates(m, k, lora_in_loop, tma_ok, dtype, n, programs) + [LIBRARY_GEMM]


# --------------------------------------------------------------------------- the tuner


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M: the tuner's keys must not grow with every M."""
    return 1 << max(0, (max(m, 1) - 1).bit_length())


V = TypeVar("V")

# Key (kernel name, device, dtypes, precision, shapes, M bucket, ...) -> fastest variant.
TUNED: Dict[Hashable, Any] = {}


def pick(
    key: Hashable,
    run: Callable[[V], None],
    candidates: Callable[[], Sequence[V]],
    *,
    fixed: Any = INTERPRETER_CONFIG,
) -> V:
    """The variant for ``key`` (``(kernel name, device index, *parts)``): ``fixed`` under
    the interpreter; on a GPU, the fastest of ``candidates()`` (built on a cache miss only,
    off the hot path): the one on disk for this card, else timed by ``run`` once and
    written to disk; cached in :data:`TUNED` either way. Inside a CUDA-graph capture,
    without a pick on disk: the first candidate, uncached.

    Candidates that do not fit (``OutOfResources``) or compile on this card are skipped.
    ``run`` must leave its outputs as one call would (timing repeats it).
    """
    if interpreter_active():
        return fixed
    found = TUNED.get(key)
    if found is None:
        cands = candidates()
        found = tuning_cache.lookup(key, cands)
        if found is None:
            if capturing():
                return cands[0]
            found = _fastest(key, run, cands)
            tuning_cache.store(key, found)
        TUNED[key] = found
    return found


def will_time(key: Hashable) -> bool:
    """Whether :func:`pick` would time candidates for ``key`` now (a launcher whose run is
    not repeatable prepares a scratch copy only then)."""
    return not interpreter_active() and key not in TUNED and not capturing()


def time_variant(run: Callable[[V], None], cand: V) -> float:
    """Milliseconds of one ``run(cand)`` (median, ``triton.testing.do_bench``)."""
    return triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20)


def _fastest(key: Hashable, run: Callable[[V], None], cands: Sequence[V]) -> V:
    best = None
    for cand in cands:
        try:
            ms = time_variant(run, cand)
        except (OutOfResources, CompilationError):  # does not fit / compile on this card
            continue
        if best is None or ms < best[0]:
            best = (ms, cand)
    if best is None:
        raise RuntimeError(f"no kernel variant compiles for key {key}")
    return best[1]
