"""AdaLoRA layer (SVD form on the fused LoRA op) vs cuBLAS base, the unfused form and PEFT's SVDLinear.

    python benchmarks/bench_adalora.py            # full sweep (GPU): 3 shapes x 4 M, r 12
    python benchmarks/bench_adalora.py --quick    # 2 shapes x 2 M

Variants (bf16, ``W: (N, K)``, ``y = x W^T + (x (A ∘ E)^T B^T) * s``, ``s = alpha / (r + 1e-5)``):

* ``base``      cuBLAS ``F.linear(x, W)``: every ratio is to this time, same run;
* ``unfused``   ``F.linear(x, W) + (x @ (A * E).T @ B.T) * s`` (PEFT's math, in PyTorch);
* ``peft``      ``peft.tuners.adalora.SVDLinear`` (when peft is installed);
* ``fastpeft``  ``fastpeft.AdaLoraLinear`` (``A ∘ E`` folded per call, then the fused LoRA op).

Rows with ``pass = fwd+bwd`` time a training step's forward and backward (gradients of
``x``, ``A``, ``E`` and ``B``; the base frozen) against the base's forward and ``dx``.
Every variant is checked against an fp32 reference before it is timed. Without a GPU the
script says so and runs a correctness-only pass under the Triton interpreter.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import common

ON_GPU = common.setup_interpreter()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastpeft.methods.adalora.layer import AdaLoraLinear  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
MS = [16, 256, 1024, 4096]
QUICK_SHAPES, QUICK_MS = SHAPES[:2], [256, 4096]
RANK = 12  # PEFT's default init_r
ALPHA = 32.0
BF16_TOL = 3e-2
Tensors = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _scale(r: int) -> float:
    return ALPHA / (r + 1e-5)


def _fastpeft_layer(W: torch.Tensor, A, E, B) -> AdaLoraLinear:
    N, K = W.shape
    base = nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight.data = W
    layer = AdaLoraLinear.wrap(base, r=A.shape[0], lora_alpha=ALPHA, backend="triton")
    adapter = layer.adapters["default"]
    for name, t in (("lora_A", A), ("lora_E", E), ("lora_B", B)):
        getattr(adapter, name).data.copy_(t)
    return layer.eval()


def _peft_layer(W: torch.Tensor, A, E, B) -> Optional[nn.Module]:
    """PEFT's own ``SVDLinear`` around an ``nn.Linear`` holding ``W``; None without peft."""
    try:
        from peft import AdaLoraConfig
        from peft.tuners.adalora import SVDLinear
    except ImportError:
        return None
    N, K = W.shape
    r = A.shape[0]
    base = nn.Linear(K, N, bias=False, device=W.device, dtype=W.dtype)
    base.weight.data = W
    config = AdaLoraConfig(init_r=r, lora_alpha=ALPHA, total_step=10, target_modules=["x"])
    layer = SVDLinear(base, "default", config=config, r=r, lora_alpha=ALPHA)
    layer.to(device=W.device, dtype=W.dtype)
    for name, t in (("lora_A", A), ("lora_E", E), ("lora_B", B)):
        getattr(layer, name)["default"].data.copy_(t)
    return layer.eval()


def _unfused(x, W, A, E, B) -> torch.Tensor:
    return F.linear(x, W) + (x @ (A * E).T @ B.T) * _scale(A.shape[0])


def _ref(x, W, A, E, B) -> torch.Tensor:
    f = lambda t: t.float()  # noqa: E731
    return _unfused(f(x), f(W), f(A), f(E), f(B))


def _inputs(K: int, N: int, M: int, r: int, dev: str, dt: torch.dtype) -> Tensors:
    """``(x, W, A, E, B)`` of one point."""
    x = torch.randn(M, K, device=dev, dtype=dt)
    W = torch.randn(N, K, device=dev, dtype=dt) / math.sqrt(K)
    A = torch.randn(r, K, device=dev, dtype=dt) / math.sqrt(K)
    E = torch.randn(r, 1, device=dev, dtype=dt)
    B = torch.randn(N, r, device=dev, dtype=dt) / math.sqrt(r)
    return x, W, A, E, B


def _time_point(K: int, N: int, M: int, r: int = RANK, dev: str = "cuda", dt: torch.dtype = torch.bfloat16):
    """One forward point: check every variant, then time it."""
    x, W, A, E, B = _inputs(K, N, M, r, dev, dt)
    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "base": lambda: F.linear(x, W),
        "unfused": lambda: _unfused(x, W, A, E, B),
        "fastpeft": (lambda layer: lambda: layer(x))(_fastpeft_layer(W, A, E, B)),
    }
    peft_layer = _peft_layer(W, A, E, B)
    if peft_layer is not None:
        fns["peft"] = lambda: peft_layer(x)
    ref = _ref(x, W, A, E, B)
    row: Dict[str, Any] = {"pass": "fwd", "K": K, "N": N, "M": M, "r": r}
    with torch.no_grad():
        common.measure_variants(row, fns, lambda name: ref, BF16_TOL, False)
    return row


def _time_train_point(K: int, N: int, M: int, r: int = RANK, dev: str = "cuda", dt: torch.dtype = torch.bfloat16):
    """One training point (forward + backward to x, A, E, B), checked on ``dx``, then timed."""
    x, W, A, E, B = _inputs(K, N, M, r, dev, dt)
    x = x.requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=dt)
    own = [t.detach().clone().requires_grad_() for t in (A, E, B)]

    def grads(y: torch.Tensor, wrt) -> torch.Tensor:
        return torch.autograd.grad(y, wrt, g)[0]

    layer = _fastpeft_layer(W, A, E, B).train()
    mine = [getattr(layer.adapters["default"], n) for n in ("lora_A", "lora_E", "lora_B")]
    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "base": lambda: grads(F.linear(x, W), [x]),
        "unfused": lambda: grads(_unfused(x, W, *own), [x, *own]),
        "fastpeft": lambda: grads(layer(x), [x, *mine]),
    }
    peft_layer = _peft_layer(W, A, E, B)
    if peft_layer is not None:
        peft_layer.train()
        theirs = [getattr(peft_layer, n)["default"] for n in ("lora_A", "lora_E", "lora_B")]
        fns["peft"] = lambda: grads(peft_layer(x), [x, *theirs])
    s = _scale(r)
    ref_dx = g.float() @ W.float() + s * ((g.float() @ B.float()) @ (A.float() * E.float()))
    row: Dict[str, Any] = {"pass": "fwd+bwd", "K": K, "N": N, "M": M, "r": r}
    common.measure_variants(row, fns, lambda name: ref_dx, BF16_TOL, False)
    return row


def run_gpu(quick: bool, json_path: Optional[str], info: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    points = [(K, N, M) for K, N in (QUICK_SHAPES if quick else SHAPES) for M in (QUICK_MS if quick else MS)]
    for K, N, M in common.progress(points, "bench_adalora"):
        for point in (_time_point, _time_train_point):
            row = point(K, N, M)
            rows.append(row)
            common.write_partial(json_path, info, quick, rows)
            common.say(f"{row['pass']} K={K} N={N} M={M}: fastpeft {row.get('fastpeft_x') or float('nan'):.3f}x, "
                       f"peft {row.get('peft_x') or float('nan'):.3f}x")
            torch.cuda.empty_cache()
    return rows


def run_cpu() -> List[Dict[str, Any]]:
    """Correctness only: the layer under the interpreter vs the float64 form, forward and
    every gradient of a training step."""
    rows = []
    for (K, N), M, r in [((96, 80), 5, 12), ((70, 130), 17, 7)]:
        x, W, A, E, B = _inputs(K, N, M, r, "cpu", torch.float32)
        layer = _fastpeft_layer(W, A, E, B).train()
        xg = x.clone().requires_grad_()
        y = layer(xg)
        g = torch.randn_like(y)
        mine = [getattr(layer.adapters["default"], n) for n in ("lora_A", "lora_E", "lora_B")]
        got = torch.autograd.grad(y, [xg, *mine], g)
        d = [t.double().requires_grad_() for t in (x, A, E, B)]
        ref = _unfused(d[0], W.double(), *d[1:])
        want = torch.autograd.grad(ref, d, g.double())
        checks = {"fwd": (y, ref)}
        checks.update({f"d{n}": (a, b) for n, a, b in zip(("x", "A", "E", "B"), got, want)})
        for what, (out, expect) in checks.items():
            err = common.check_close(f"adalora {what} K={K} N={N} M={M} r={r}", out.detach(), expect.detach(), 1e-5)
            rows.append({"check": what, "K": K, "N": N, "M": M, "r": r, "rel_err": err, "tol": 1e-5})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    args = common.base_args(__doc__.splitlines()[0], "bench_adalora.json").parse_args(argv)
    return common.run_benchmark(
        args,
        what="the AdaLoRA layer",
        run_cpu=run_cpu,
        cpu_columns=["check", "K", "N", "M", "r", "rel_err", "tol"],
        run_gpu=lambda info: run_gpu(args.quick, args.json, info),
        gpu_columns=["pass", "K", "N", "M", "r", "base_ms", "unfused_x", "peft_x", "fastpeft_x"],
        key_columns=["pass", "K", "N", "M", "r"],
        title="ratios to cuBLAS base F.linear(x, W), same run (bf16); fwd+bwd rows: to the base's forward + dx",
    )


if __name__ == "__main__":
    sys.exit(main())
