"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter runs kernels on the CPU but is lenient where real hardware is not
(shared-memory limits, pipelining, tensor-core instruction selection). Triton ships its
own ptxas, so every GPU launch config can still be compiled here, ahead of time, with the
same specialisations the JIT would apply at launch (pointers 16-byte aligned, unit
strides folded to constants), and its shared-memory use and pipelining inspected.

Compiling needs the kernels as real ``JITFunction`` objects, which they are not while
``TRITON_INTERPRET=1`` (the test session's setting): ``report_sm90`` therefore compiles
in a child process with the interpreter off. A spec is plain data::

    {"id": "bf16-128x256", "module": "fastpeft.kernels.lora",
     "kernel": "_lora_linear_fwd_kernel", "ptr_dtypes": {"x_ptr": "bf16", ...},
     "constexprs": {"BLOCK_M": 128, ...}, "unit_args": ["stride_xk"],
     "float_args": ["scaling"], "num_warps": 8, "num_stages": 3}
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

# Shared memory per block on H100/H200 (227 KiB opt-in).
HOPPER_MAX_SHARED = 232448

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def compile_sm90(
    kernel,
    *,
    ptr_dtypes: Mapping[str, str],
    constexprs: Mapping[str, object],
    unit_args: Iterable[str] = (),
    float_args: Iterable[str] = (),
    descriptors: Mapping[str, str] = {},
    num_warps: int = 4,
    num_stages: int = 3,
):
    """AOT-compile ``kernel`` for sm_90. ``ptr_dtypes``: pointer arg -> "fp16"/"bf16"/
    "fp32"/"i32"...; ``unit_args``: int args specialised to 1 (unit strides); other int
    args are i32 and, like pointers, assumed divisible by 16 (what the JIT sees for
    aligned, padded shapes); ``descriptors``: TMA descriptor arg -> its type, e.g.
    ``"tensordesc<bf16[128, 64]>"`` (dtype and block shape). Returns triton's compiled kernel (``.metadata``, ``.asm``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    defaults = {n: p.default for n, p in inspect.signature(kernel.fn).parameters.items()}
    params = list(defaults)
    consts: Dict[str, object] = dict(constexprs)
    unit, floats = set(unit_args), set(float_args)
    signature, attrs = {}, {}
    for i, name in enumerate(params):
        if name in descriptors:
            signature[name] = descriptors[name]
        elif name in ptr_dtypes:
            signature[name] = "*" + _DTYPES.get(ptr_dtypes[name], ptr_dtypes[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in consts:
            signature[name] = "constexpr"
        elif defaults[name] is not inspect.Parameter.empty:  # a constexpr the spec leaves at its default
            signature[name] = "constexpr"
            consts[name] = defaults[name]
        elif name in unit:
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def is_pipelined(compiled) -> bool:
    """True when global loads of the main loop became asynchronous (cp.async or TMA)."""
    ttgir = compiled.asm["ttgir"]
    return "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir


def uses_wgmma(compiled) -> bool:
    return "warp_group_dot" in compiled.asm["ttgir"]


def _report_one(spec: Mapping[str, Any]) -> Dict[str, Any]:
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    try:
        compiled = compile_sm90(
            kernel,
            ptr_dtypes=spec["ptr_dtypes"],
            constexprs=spec["constexprs"],
            unit_args=spec.get("unit_args", ()),
            float_args=spec.get("float_args", ()),
            descriptors=spec.get("descriptors", {}),
            num_warps=spec.get("num_warps", 4),
            num_stages=spec.get("num_stages", 3),
        )
    except Exception as exc:  # reported to the test, which fails with the message
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"shared": compiled.metadata.shared, "pipelined": is_pipelined(compiled), "wgmma": uses_wgmma(compiled)}


def report_sm90(specs: List[Mapping[str, Any]], timeout: float = 900) -> Dict[str, Dict[str, Any]]:
    """Compile every spec for sm_90 in a child process (interpreter off); by spec id."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sm_90 compile process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    specs = json.load(sys.stdin)
    print(json.dumps({spec["id"]: _report_one(spec) for spec in specs}))
