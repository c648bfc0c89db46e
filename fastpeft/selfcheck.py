"""The self-check: show what fastpeft does on this machine (``fastpeft selfcheck``).

On a CUDA GPU it runs the compiled Triton kernels in fp16/bf16/fp32 against the float64
reference and times the fused LoRA layer against the cuBLAS base GEMM for a few Llama
shapes. On a CPU it runs the same Triton kernels under the interpreter
(``TRITON_INTERPRET=1``, re-executing itself with it when it is not set) and checks them
against the reference; no timings, since interpreted kernels say nothing about speed.
Exits non-zero when any check fails.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

_INTERPRET_VAR = "TRITON_INTERPRET"
_HELP = """Show what fastpeft does on this machine.

On a CUDA GPU: run the compiled Triton kernels in fp16, bf16 and fp32 against a float64
reference, then time the fused LoRA layer against the cuBLAS base GEMM for a few Llama
shapes. On a CPU: run the same kernels under the Triton interpreter (turned on
automatically) and check them against the reference; no timings, since interpreted
kernels say nothing about speed. Exits with 1 when any check fails.

Also runs as: python -m fastpeft.selfcheck, or fastpeft-selfcheck."""


def _ensure_interpreter_on_cpu(argv: Sequence[str]) -> None:
    """Without CUDA the kernels only run under the interpreter, whose flag must be set
    before triton is imported: re-run this module with it set."""
    if torch.cuda.is_available() or os.environ.get(_INTERPRET_VAR, "") not in ("", "0"):
        return
    if os.environ.get(_INTERPRET_VAR) == "0":
        return  # the user asked for no interpreter: the checks report the reference only
    env = dict(os.environ, **{_INTERPRET_VAR: "1"})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastpeft.selfcheck", *argv], env)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom else 1.0)


_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


_LORA_CASES = [(1, 96, 80, 8), (33, 70, 130, 16), (5, 64, 48, 64), (17, 40, 56, 128)]


def _lora_kernel_checks(device: str, dtypes: Sequence[torch.dtype], cases=_LORA_CASES) -> List[CheckResult]:
    """The fused LoRA kernel (launched directly, so no fallback can hide) vs float64."""
    from fastpeft.kernels import lora as lora_kernels
    from fastpeft.kernels.reference import lora_linear_ref

    results = []
    for dt in dtypes:
        for M, K, N, r in cases:
            g = torch.Generator().manual_seed(M * 1000 + r)
            x = torch.randn(M, K, generator=g).to(device, dt)
            W = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device, dt)
            b = torch.randn(N, generator=g).to(device, dt)
            A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, dt)
            B = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device, dt)
            out = lora_kernels.lora_linear_fwd(x, W, b, A, B, 2.0 / r)
            ref = lora_linear_ref(*(t.double() for t in (x, W, b, A, B)), 2.0 / r)
            err = _rel_err(out, ref)
            name = f"lora kernel {str(dt)[6:]:8s} M={M:<3d} K={K:<3d} N={N:<3d} r={r}"
            results.append(CheckResult(name, err <= _TOL[dt], f"rel err {err:.2e} (tol {_TOL[dt]:.0e})"))
    return results


def _randn(g: torch.Generator, shape, device: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _adapter_kernel_checks(device: str, dtypes: Sequence[torch.dtype]) -> List[CheckResult]:
    """(IA)^3, bottleneck and mixed-adapter kernels, launched directly, vs float64."""
    from fastpeft.kernels import bottleneck, ia3, multi_lora
    from fastpeft.kernels import reference as ref

    results = []
    M, K, N, D = 33, 72, 56, 16
    for dt in dtypes:
        g = torch.Generator().manual_seed(7)
        x = _randn(g, (M, K), device, dt)
        W = _randn(g, (N, K), device, dt, 1 / math.sqrt(K))
        b = _randn(g, (N,), device, dt)
        d = lambda t: t.double()  # noqa: E731
        tol = _TOL[dt]
        for scale_input in (False, True):
            l = _randn(g, (K if scale_input else N,), device, dt, 0.5) + 1
            out = ia3.ia3_linear_fwd(x, W, b, l, scale_input)
            err = _rel_err(out, ref.ia3_linear_ref(d(x), d(W), d(b), d(l), scale_input))
            form = "input" if scale_input else "output"
            results.append(CheckResult(f"ia3 kernel {str(dt)[6:]:8s} {form} scaling", err <= tol, f"rel err {err:.2e}"))
        Wd, bd = _randn(g, (D, N), device, dt, 1 / math.sqrt(N)), _randn(g, (D,), device, dt, 0.1)
        Wu, bu = _randn(g, (N, D), device, dt, 1 / math.sqrt(D)), _randn(g, (N,), device, dt, 0.1)
        out = bottleneck.bottleneck_linear_fwd(x, W, b, Wd, bd, Wu, bu, 0.5, "gelu")
        err = _rel_err(out, ref.bottleneck_linear_ref(d(x), d(W), d(b), d(Wd), d(bd), d(Wu), d(bu), 0.5, "gelu"))
        results.append(CheckResult(f"bottleneck kernel {str(dt)[6:]:8s} D={D} gelu", err <= tol, f"rel err {err:.2e}"))
        S, R = 5, 16
        A = _randn(g, (S, R, K), device, dt, 1 / math.sqrt(K))
        B = _randn(g, (S, N, R), device, dt, 1 / math.sqrt(R))
        ranks = torch.tensor([16, 1, 8, 0, 5], dtype=torch.int32, device=device)
        scalings = torch.tensor([0.5, 2.0, 1.0, 1.0, 0.25], dtype=torch.float32, device=device)
        row_slot = torch.randint(-1, S, (M,), generator=g).to(device=device, dtype=torch.int32)
        meta = multi_lora.MultiLoraMeta.build(row_slot, S)
        out = multi_lora.multi_lora_linear_fwd(x, W, b, A, B, ranks, scalings, meta)
        expect = ref.multi_lora_linear_ref(d(x), d(W), d(b), d(A), d(B), ranks, scalings.double(), row_slot)
        err = _rel_err(out, expect)
        results.append(CheckResult(f"mixed-adapter kernel {str(dt)[6:]:8s} {S} slots", err <= tol, f"rel err {err:.2e}"))
    return results


def _module_checks(device: str) -> List[CheckResult]:
    """FastLoRALinear: forward, gradients and merge round trip vs the reference."""
    import fastpeft as fp

    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, device=device)
    layer = fp.FastLoRALinear.from_linear(base, r=8, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 48, device=device, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    ref_layer_x = x.detach().double().requires_grad_(True)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    y_ref = torch.nn.functional.linear(ref_layer_x, base.weight.double(), base.bias.double()) + layer.scaling * (
        ref_layer_x @ A.t() @ B.t()
    )
    y_ref.square().sum().backward()
    errs = {
        "forward": _rel_err(y, y_ref),
        "grad x": _rel_err(x.grad, ref_layer_x.grad),
        "grad A": _rel_err(layer.lora_A.grad, A.grad),
        "grad B": _rel_err(layer.lora_B.grad, B.grad),
    }
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    errs["merge"] = _rel_err(merged, before)
    worst = max(errs.values())
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return [CheckResult("FastLoRALinear fwd/bwd/merge (fp32)", worst <= 1e-5, detail)]


def _gpu_timings(shapes: Sequence[tuple], ms: Sequence[int], r: int) -> List[str]:
    """A short table: cuBLAS base vs fused LoRA (bf16), ratios from the same run."""
    import triton.testing

    from fastpeft.methods.lora.op import lora_linear

    lines = [f"{'K':>6} {'N':>6} {'M':>6}  base ms  fused ms  fused/base  (bf16, r={r})"]
    for K, N in shapes:
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
            A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16) / math.sqrt(K)
            B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) / math.sqrt(r)
            with torch.no_grad():
                t_base = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, W), return_mode="median")
                t_fused = triton.testing.do_bench(
                    lambda: lora_linear(x, W, None, A, B, 2.0, backend="triton"), return_mode="median"
                )
            lines.append(f"{K:>6} {N:>6} {M:>6}  {t_base:7.4f}  {t_fused:8.4f}  {t_fused / t_base:10.3f}")
    return lines


def _print_results(results: List[CheckResult]) -> None:
    for res in results:
        print(f"  [{'ok' if res.ok else 'FAIL'}] {res.name}: {res.detail}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="fastpeft selfcheck",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the GPU timings")
    parser.add_argument("--quick", action="store_true",
                        help="one LoRA kernel case per dtype and the layer check only (seconds, not a minute)")
    args = parser.parse_args(argv)
    _ensure_interpreter_on_cpu(argv)

    import triton

    import fastpeft as fp
    from fastpeft.kernels.runtime import interpreter_active

    gpu = torch.cuda.is_available() and not interpreter_active()
    device = "cuda" if gpu else "cpu"
    where = torch.cuda.get_device_name(0) if gpu else "CPU (Triton interpreter)" if interpreter_active() else "CPU"
    print(f"fastpeft {fp.__version__}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device: {where}; auto backend runs: {fp.resolve_backend('auto', torch.device(device))}")
    if not gpu and not interpreter_active():
        print("TRITON_INTERPRET=0 on a machine without CUDA: no Triton kernel can run here.")
        return 1

    start = time.perf_counter()
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if gpu else [])
    print("\nchecks against the float64 reference" + ("" if gpu else " (bf16 needs a GPU: the interpreter lacks bf16 dot)"))
    results: List[CheckResult] = []
    checks = (
        lambda: _lora_kernel_checks(device, dtypes),
        lambda: _adapter_kernel_checks(device, dtypes),
        lambda: _module_checks(device),
    )
    if args.quick:
        checks = (lambda: _lora_kernel_checks(device, dtypes, _LORA_CASES[1:2]), lambda: _module_checks(device))
    for check in checks:
        batch = check()
        _print_results(batch)
        results += batch
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} checks passed in {time.perf_counter() - start:.1f} s")

    if gpu and not args.no_bench and not failed:
        print("\nfused LoRA vs cuBLAS base GEMM, same run:")
        for line in _gpu_timings([(4096, 4096), (4096, 14336), (14336, 4096)], [16, 1024, 4096], 16):
            print("  " + line, flush=True)
        print("full sweeps: python benchmarks/bench_lora.py (see README)")
    elif not gpu:
        print("no GPU here, so no timings: run benchmarks/gpu_check.sh on a CUDA machine for them")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
