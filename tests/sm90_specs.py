"""The sm_90 compile specs of every kernel (see ``sm90.py``): one builder per kernel,
and :func:`catalogue`, every tuner candidate of every kernel in the variants it runs.

Candidates come from ``kernels/autotune.py``'s lists, probed over M and K, so a
candidate added there is compiled and reported without a change here. Each spec carries
labels for the compiler report (``kernel``, ``dtype``, ``config``, ``variant``) and
``tuned``: True for the variants the tuner offers with 16-bit inputs and same-dtype
adapters, the ones that must neither spill nor overflow shared memory.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch

from fastpeft.kernels import autotune
from fastpeft.kernels import bottleneck as bn_kernels
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels.autotune import KernelConfig
from fastpeft.kernels.lora import MAX_IN_LOOP_RANK
from fastpeft.kernels.lora_tma import tma_stages
from fastpeft.kernels.multi_lora_meta import (
    EXPAND_BLOCK_R, expand_candidates, gather_block_r, gpu_split_k, shrink_block_r,
)

Spec = Dict[str, Any]

# M and K at which the candidate lists are probed: every power of two and one past it
# (the lists change at such thresholds), prefill-sized and decode-sized K.
M_PROBES = sorted({1 << i for i in range(15)} | {(1 << i) + 1 for i in range(15)})
K_PROBES = (4096, 16384)
HALF = ("bf16", "fp16")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def cfg_id(cfg: KernelConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"


def _sorted(cfgs: Iterable[Any]) -> List[KernelConfig]:
    """Distinct tile configs (the library-GEMM variant has no Triton kernel), in a stable order."""
    tiles = {c for c in cfgs if isinstance(c, KernelConfig)}
    return sorted(tiles, key=lambda c: (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.split_k,
                                        c.precompute_xa, c.tma))


def gemm_configs(dtype: Optional[torch.dtype] = None, max_m: Optional[int] = None) -> List[KernelConfig]:
    """Every GEMM tile the tuner times (for M up to ``max_m``), sized for ``dtype``."""
    return _sorted(c for m in M_PROBES if max_m is None or m <= max_m for c in autotune.gemm_candidates(m, dtype))


# An H100/H200's SMs, and output widths (Llama-3-8B's projections) whose grids leave SMs
# idle past decode: the tuner's split-K candidates beyond M = 64 (TMA tiles included).
H100_SMS = 132
N_PROBES = (4096,)


def lora_configs(dtype: Optional[torch.dtype] = None) -> List[KernelConfig]:
    """Every LoRA candidate (tiles, split-K, precomputed xa, TMA), sized for ``dtype``."""
    return _sorted(c for m in M_PROBES for k in K_PROBES for n in N_PROBES for in_loop in (True, False)
                   for c in autotune.lora_candidates(m, k, in_loop, tma_ok=True, dtype=dtype, n=n,
                                                     programs=H100_SMS))


# --------------------------------------------------------------------------- LoRA

LORA_UNIT_STRIDES = ["stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_xar", "stride_yn"]
# The input gradient runs the forward kernel on transposed views (W^T, B^T, A^T): other
# strides are the unit ones.
BACKWARD_UNIT_STRIDES = ["stride_xk", "stride_wn", "stride_ar", "stride_bn", "stride_yn"]
_LORA_PTRS = ["x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "xa_ptr", "y_ptr"]


def lora_spec(cfg, dtype: str, block_r: int, in_loop: bool, adapter_dtype: str = "", precision: str = "") -> Spec:
    """The tiled LoRA kernel: in-loop shrink (``in_loop``, rank padded to ``block_r``),
    precomputed ``xa`` read in ``block_r`` chunks, or the base GEMM alone (``block_r`` 0)."""
    ptrs = {p: dtype for p in _LORA_PTRS}
    # Adapters kept in another dtype than a 16-bit x (fp32 adapters on a bf16/fp16 base):
    # the LoRA branch keeps fp32 range (tf32 dots, fp32 xa).
    lora_fp32 = bool(adapter_dtype) and adapter_dtype != dtype and dtype != "fp32"
    if adapter_dtype:
        ptrs.update(a_ptr=adapter_dtype, b_ptr=adapter_dtype)
    if lora_fp32:
        ptrs["xa_ptr"] = "fp32"
    if cfg.split_k > 1:  # split-K programs write fp32 partial sums
        ptrs["y_ptr"] = "fp32"
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    variant = "base" if block_r == 0 else f"{'loop' if in_loop else 'epi'}-r{block_r}"
    return {
        "id": f"{dtype}{tag}-{cfg_id(cfg)}-k{cfg.split_k}-r{block_r}-{'loop' if in_loop else 'epi'}{precision}",
        "kernel_name": "lora", "dtype": dtype + tag, "config": f"{cfg_id(cfg)}k{cfg.split_k}",
        "variant": variant + (f"-{precision}" if precision else ""),
        "module": "fastpeft.kernels.lora",
        "kernel": "_lora_linear_fwd_kernel",
        "ptr_dtypes": ptrs,
        "constexprs": dict(
            HAS_BIAS=True, HAS_LORA=block_r > 0, SHRINK_IN_LOOP=in_loop, SPLIT_K=cfg.split_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=max(block_r, 16),
            GROUP_M=cfg.group_m, LORA_FP32=lora_fp32, INPUT_PRECISION=precision or "ieee",
        ),
        "unit_args": LORA_UNIT_STRIDES,
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def lora_backward_spec(cfg, dtype: str = "bf16", precision: str = "", adapter_dtype: str = "") -> Spec:
    """The LoRA kernel on the input gradient's transposed views (in-loop shrink, r <= 16)."""
    spec = lora_spec(cfg, dtype, 16, True, adapter_dtype=adapter_dtype, precision=precision)
    spec["id"] = "backward-" + spec["id"]
    spec["variant"] = "backward-" + spec["variant"]
    spec["unit_args"] = BACKWARD_UNIT_STRIDES
    return spec


def lora_tma_spec(cfg, block_r: int, pre: bool, dtype: str = "bf16", precision: str = "ieee",
                  adapter_dtype: str = "") -> Spec:
    """The persistent TMA LoRA kernel: in-loop shrink, precomputed ``xa`` (``pre``) or base alone."""
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    at = adapter_dtype or dtype
    lora_fp32 = at != dtype and dtype != "fp32"
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    tag += f"-k{cfg.split_k}" if cfg.split_k > 1 else ""
    variant = "base" if block_r == 0 else f"{'epi' if pre else 'loop'}-r{block_r}"
    # Split-K units store fp32 partial sums into a (splits, M, N) buffer.
    y_desc = f"tensordesc<fp32[1, {bm}, {bn}]>" if cfg.split_k > 1 else f"tensordesc<{dtype}[{bm}, {bn}]>"
    return {
        "id": f"tma-{dtype}{tag}-{cfg_id(cfg)}-r{block_r}-{'pre' if pre else 'loop'}{precision}",
        "kernel_name": "lora_tma", "dtype": dtype + tag, "config": cfg_id(cfg),
        "variant": variant + ("" if precision == "ieee" else f"-{precision}"),
        "module": "fastpeft.kernels.lora_tma",
        "kernel": "_lora_linear_tma_kernel",
        "descriptors": {
            "x_desc": f"tensordesc<{dtype}[{bm}, {bk}]>",
            "w_desc": f"tensordesc<{dtype}[{bn}, {bk}]>",
            "a_desc": f"tensordesc<{at}[{max(block_r, 16)}, {bk}]>" if not pre else f"tensordesc<{dtype}[{bn}, {bk}]>",
            "y_desc": y_desc,
        },
        "ptr_dtypes": {"bias_ptr": dtype, "b_ptr": at, "xa_ptr": "fp32" if lora_fp32 else dtype},
        "constexprs": dict(
            HAS_BIAS=True, HAS_LORA=block_r > 0, SHRINK_IN_LOOP=block_r > 0 and not pre, SPLIT_K=cfg.split_k,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=max(block_r, 16), GROUP_M=cfg.group_m,
            LORA_FP32=lora_fp32, INPUT_PRECISION=precision,
        ),
        "unit_args": ["stride_br", "stride_xar"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        # what the launcher runs: fewer stages where a wide in-loop shrink would not fit
        "num_stages": tma_stages(cfg, max(block_r, 16), block_r > 0 and not pre, _BYTES[dtype], _BYTES[at]),
    }


def splitk_reduce_spec(dtype: str = "bf16") -> Spec:
    REDUCE_BLOCK_M, REDUCE_BLOCK_N = lora_kernels._REDUCE_BLOCK_M, lora_kernels._REDUCE_BLOCK_N
    return {
        "id": "splitk-reduce" + ("" if dtype == "bf16" else f"-{dtype}"),
        "kernel_name": "splitk_reduce", "dtype": dtype, "config": f"{REDUCE_BLOCK_M}x{REDUCE_BLOCK_N}w4",
        "variant": "split4",
        "module": "fastpeft.kernels.lora",
        "kernel": "_splitk_reduce_kernel",
        "ptr_dtypes": {"p_ptr": "fp32", "bias_ptr": dtype, "y_ptr": dtype},
        "constexprs": dict(HAS_BIAS=True, SPLIT_K=4, BLOCK_M=REDUCE_BLOCK_M, BLOCK_N=REDUCE_BLOCK_N),
        "unit_args": ["stride_pn", "stride_yn"],
    }


# --------------------------------------------------------------------------- (IA)^3, bottleneck


def ia3_spec(cfg, scale_input: bool, dtype: str = "bf16", precision: str = "ieee") -> Spec:
    return {
        "id": f"ia3-{dtype}-{cfg_id(cfg)}-{'in' if scale_input else 'out'}-{precision}",
        "kernel_name": "ia3", "dtype": dtype, "config": cfg_id(cfg),
        "variant": ("scale-in" if scale_input else "scale-out") + ("" if precision == "ieee" else f"-{precision}"),
        "module": "fastpeft.kernels.ia3",
        "kernel": "_ia3_linear_fwd_kernel",
        "ptr_dtypes": {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "l_ptr": "fp32", "y_ptr": dtype},
        "constexprs": dict(HAS_BIAS=True, SCALE_INPUT=scale_input, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, INPUT_PRECISION=precision),
        "unit_args": ["stride_xk", "stride_wk", "stride_l", "stride_yn"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def bn_spec(cfg, act: int, dtype: str = "bf16", has_gemm: bool = True, precision: str = "ieee") -> Spec:
    return {
        "id": f"bn-{dtype}-{cfg_id(cfg)}-act{act}-{'gemm' if has_gemm else 'epi'}-{precision}",
        "kernel_name": "bottleneck", "dtype": dtype, "config": cfg_id(cfg),
        "variant": f"{'gemm' if has_gemm else 'epilogue'}-act{act}" + ("" if precision == "ieee" else f"-{precision}"),
        "module": "fastpeft.kernels.bottleneck",
        "kernel": "_bottleneck_linear_fwd_kernel",
        "ptr_dtypes": {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "z_ptr": dtype, "beff_ptr": "fp32",
                       "up_ptr": dtype, "upb_ptr": dtype, "y_ptr": dtype},
        "constexprs": dict(HAS_GEMM=has_gemm, HAS_BIAS=has_gemm, HAS_UP_BIAS=True, ACTIVATION=act, BLOCK_M=cfg.block_m,
                           BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=bn_kernels.BLOCK_D,
                           GROUP_M=cfg.group_m, INPUT_PRECISION=precision),
        "unit_args": ["stride_xk", "stride_wk", "stride_zd", "stride_ud", "stride_yn"],
        "float_args": ["scaling"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


# --------------------------------------------------------------------------- mixed-adapter LoRA

_I32 = "i32"


def mlora_expand_spec(cfg, dtype: str, fuse: bool, split_k: int, block_r: int = 16, gather: bool = False,
                      precision: str = "ieee", adapter_dtype: str = "") -> Spec:
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    return {
        "id": f"expand-{dtype}{tag}-{cfg_id(cfg)}"
              f"-{'fused' if fuse else 'split'}-k{split_k}-r{block_r}{'-gather' if gather else ''}-{precision}",
        "kernel_name": "mlora_expand", "dtype": dtype + tag, "config": cfg_id(cfg),
        "variant": f"{'gather' if gather else 'segments'}-{'fused' if fuse else 'split'}-k{split_k}-r{block_r}"
                   + ("" if precision == "ieee" else f"-{precision}"),
        "module": "fastpeft.kernels.multi_lora",
        "kernel": "_mlora_expand_kernel",
        "ptr_dtypes": {
            "x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "b_ptr": adapter_dtype or dtype, "xa_ptr": "fp32",
            "y_ptr": dtype,
            "sorted_rows_ptr": _I32, "sorted_slot_ptr": _I32, "seg_end_ptr": _I32, "rank_ptr": _I32,
            "scaling_ptr": "fp32",
        },
        "constexprs": dict(
            FUSE_BASE=fuse, HAS_BIAS=True, GATHER=gather, SPLIT_K=split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
            LORA_FP32=bool(adapter_dtype) and adapter_dtype != dtype and dtype != "fp32", INPUT_PRECISION=precision,
        ),
        "unit_args": ["stride_xk", "stride_wk", "stride_br", "stride_xar", "stride_yn"],
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def mlora_shrink_spec(dtype: str, block_m: int, block_r: int = 16, adapter_dtype: str = "") -> Spec:
    tag = f"-{adapter_dtype}" if adapter_dtype else ""
    return {
        "id": f"shrink-{dtype}{tag}-m{block_m}-r{block_r}",
        "kernel_name": "mlora_shrink", "dtype": dtype + tag, "config": f"{block_m}x{block_r}x64w4s3",
        "variant": f"r{block_r}",
        "module": "fastpeft.kernels.multi_lora",
        "kernel": "_mlora_shrink_kernel",
        "ptr_dtypes": {
            "x_ptr": dtype, "a_ptr": adapter_dtype or dtype, "xa_ptr": "fp32", "sorted_rows_ptr": _I32,
            "slot_rows_ptr": _I32, "slot_start_ptr": _I32, "rank_ptr": _I32,
        },
        "constexprs": dict(BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=block_r,
                           LORA_FP32=bool(adapter_dtype) and adapter_dtype != dtype, INPUT_PRECISION="ieee"),
        "unit_args": ["stride_xk", "stride_ak", "stride_xar"],
        "num_warps": 4,
        "num_stages": 3,
    }


# --------------------------------------------------------------------------- the catalogue


def _tuned(specs: List[Spec]) -> List[Spec]:
    for spec in specs:
        spec["tuned"] = True
    return specs


def _lora_candidate_specs(cfg: KernelConfig, dtype: str) -> List[Spec]:
    """The variants the tuner runs ``cfg`` in: in-loop shrink at r <= 16 and at the largest
    in-loop rank, the precomputed-xa epilogue; the base GEMM alone (no adapter) on bf16."""
    loop = [] if cfg.precompute_xa else [16, MAX_IN_LOOP_RANK]
    base = dtype == "bf16" and not cfg.precompute_xa and cfg.split_k == 1
    if cfg.tma:
        specs = [lora_tma_spec(cfg, r, False, dtype) for r in loop] + [lora_tma_spec(cfg, 32, True, dtype)]
        return specs + ([lora_tma_spec(cfg, 0, False, dtype)] if base else [])
    plain = KernelConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages,
                         split_k=cfg.split_k)
    specs = [lora_spec(plain, dtype, r, True) for r in loop] + [lora_spec(plain, dtype, 32, False)]
    return specs + ([lora_spec(plain, dtype, 0, True)] if base else [])


def mlora_expand_specs(dtype: str, precision: str = "ieee", adapter_dtype: str = "") -> List[Spec]:
    """The expand in every launch the tuner times: base fused or not, gathering or
    walking segments, on the tiles it offers for each M, ``xa`` in that M's K splits."""
    specs: Dict[str, Spec] = {}
    for m in M_PROBES:
        split = gpu_split_k(m)
        for fuse in (True, False):
            for gather in (True, False):
                for c in expand_candidates(m, _TORCH[dtype], fuse, gather, split):
                    spec = mlora_expand_spec(c, dtype, fuse, split, gather_block_r(c) if gather else EXPAND_BLOCK_R,
                                             gather=gather, precision=precision, adapter_dtype=adapter_dtype)
                    specs.setdefault(spec["id"], spec)
    return list(specs.values())


def tuned_specs() -> List[Spec]:
    """Every candidate of every kernel's tuner, 16-bit inputs, same-dtype adapters, in
    bf16 and fp16: the compiler report's table."""
    specs: List[Spec] = []
    for dtype in HALF:
        torch_dtype = _TORCH[dtype]
        for cfg in lora_configs(torch_dtype):
            specs += _lora_candidate_specs(cfg, dtype)
        specs.append(splitk_reduce_spec(dtype))
        gemm = gemm_configs(torch_dtype)
        specs += [ia3_spec(c, s, dtype) for c in gemm for s in (False, True)]
        specs += [bn_spec(c, a, dtype) for c in gemm for a in (1, 3)]  # gelu (erf), tanh
        specs += [bn_spec(bn_kernels.EPILOGUE_CONFIG, a, dtype, has_gemm=False) for a in (1, 3)]
        specs += mlora_expand_specs(dtype)
        specs += [mlora_shrink_spec(dtype, bm, shrink_block_r(r)) for bm in (16, 64) for r in (16, MAX_IN_LOOP_RANK)]
    return _tuned(specs)


def catalogue() -> List[Spec]:
    """:func:`tuned_specs`, then the rest the sm_90 tests check (fp32 inputs, fp32
    adapters on a 16-bit base, backward layouts, ...), ids unique."""
    out: Dict[str, Spec] = {}
    for spec in tuned_specs() + lora_test_specs() + mlora_test_specs() + ia3_bn_test_specs():
        out.setdefault(spec["id"], spec)
    return list(out.values())


# --------------------------------------------------------------------------- what the tests check

F32 = torch.float32
# Every tiled LoRA candidate's tiles (split-K and precomputed-xa flags dropped).
LORA_TILES = gemm_configs()
SPLIT_K = [c for c in lora_configs() if c.split_k > 1]
# What the tuner times for fp32 inputs (tiles sized for 4-byte elements), split-K included.
FP32_LORA_TILES = [c for c in lora_configs(F32) if not c.tma and not c.precompute_xa]
TMA = [c for c in lora_configs() if c.tma and not c.precompute_xa]
FP32_TMA = [c for c in lora_configs(F32) if c.tma and not c.precompute_xa]
# (padded rank, in-loop shrink): r <= 16, r <= 64, no adapter (base GEMM), epilogue path.
LORA_VARIANTS = [(16, True), (MAX_IN_LOOP_RANK, True), (0, True), (32, False)]
FP32_ADAPTER_VARIANTS = [(16, True), (32, False)]
# (padded rank, precomputed xa): in-loop shrink at r <= 16 / r <= 64, epilogue, base only.
TMA_VARIANTS = [(16, False), (MAX_IN_LOOP_RANK, False), (32, True), (0, False)]
FP32_LORA_VARIANTS = [(MAX_IN_LOOP_RANK, True), (32, False)]


def lora_test_specs() -> List[Spec]:
    """tests/test_sm90_compile.py's specs."""
    specs = [lora_spec(c, "bf16", r, loop) for c in LORA_TILES for r, loop in LORA_VARIANTS]
    specs += [lora_spec(c, "fp16", MAX_IN_LOOP_RANK, True) for c in LORA_TILES]
    specs += [lora_spec(c, "fp32", r, loop, precision=p) for c in FP32_LORA_TILES for p in ("ieee", "tf32")
              for r, loop in FP32_LORA_VARIANTS]
    specs += [lora_backward_spec(c, "fp32", p) for c in FP32_LORA_TILES for p in ("ieee", "tf32")]
    specs += [lora_tma_spec(c, r, pre, "fp32", "tf32") for c in FP32_TMA for r, pre in TMA_VARIANTS]
    specs += [lora_spec(c, "bf16", r, loop) for c in SPLIT_K for r, loop in ((16, True), (32, False))]
    specs += [lora_tma_spec(c, r, pre) for c in TMA for r, pre in TMA_VARIANTS]
    specs += [lora_spec(c, dt, r, loop, adapter_dtype="fp32") for c in LORA_TILES for dt in HALF
              for r, loop in FP32_ADAPTER_VARIANTS]
    specs += [lora_tma_spec(c, r, pre, "fp16", adapter_dtype="fp32") for c in TMA for r, pre in TMA_VARIANTS]
    specs += [lora_backward_spec(c) for c in LORA_TILES]
    specs += [lora_backward_spec(c, "fp16", adapter_dtype="fp32") for c in LORA_TILES]
    specs.append(splitk_reduce_spec())
    return specs


def mlora_test_specs() -> List[Spec]:
    """tests/test_multi_lora_sm90.py's specs: the expand in every launch the tuner times
    (:func:`mlora_expand_specs`) in bf16, fp32 inputs (tf32 on) and fp16 with fp32
    adapters (tf32 dots in the shrink and expand), and the shrink."""
    specs = mlora_expand_specs("bf16") + mlora_expand_specs("fp32", "tf32")
    specs += mlora_expand_specs("fp16", adapter_dtype="fp32")
    rank_chunks = sorted({shrink_block_r(r) for r in (16, MAX_IN_LOOP_RANK)})
    specs += [mlora_shrink_spec(dt, bm, br) for dt in HALF for bm in (16, 64) for br in rank_chunks]
    specs += [mlora_shrink_spec(dt, bm, br, adapter_dtype="fp32") for dt in HALF for bm in (16, 64)
              for br in rank_chunks]
    return specs


def ia3_bn_test_specs() -> List[Spec]:
    """tests/test_ia3_bottleneck_sm90.py's specs."""
    tiles, tiles32 = gemm_configs(), gemm_configs(F32)
    specs = [ia3_spec(c, s) for c in tiles for s in (False, True)]
    specs += [bn_spec(c, a) for c in tiles for a in (1, 3)]  # gelu (erf), tanh
    specs += [bn_spec(bn_kernels.EPILOGUE_CONFIG, a, has_gemm=False) for a in (0, 1, 2, 3)]
    specs += [ia3_spec(c, s, "fp32", "tf32") for c in tiles32 for s in (False, True)]
    specs += [bn_spec(c, 1, "fp32", precision="tf32") for c in tiles32]
    return specs
