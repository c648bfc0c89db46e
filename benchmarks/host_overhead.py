"""Host (Python) work per forward of fastpeft's layers, with the Triton launch stubbed out.

What it measures, per case (a layer and an input): the time of one ``layer(x)`` call on
the CPU, with every Triton kernel launch replaced by a no-op that counts it, so only the
work done in Python around the kernels is timed: attribute lookups, checks, autocast,
dispatch, tuner lookups, launch arguments, output allocation. Beside the time (min and
median over rounds), exact per-forward counts that do not move with the machine's load:

* ``launches``: Triton kernel launches;
* ``aten_ops``: PyTorch operators dispatched (``TorchDispatchMode``; the ops inside
  fastpeft's custom ops are counted too);
* ``allocs``: those of them that return a new tensor (``empty``, factories, out-of-place
  math: a schema return without alias information), i.e. tensor allocations;
* ``python_calls``: Python-level function calls.

Times are reported as a ratio to ``nn.Linear``'s host time at M = 1 measured in the same
run (``F.linear`` at that size is dominated by its own dispatch). Cases: ``nn.Linear``,
PEFT's LoRA layer, ``FastLoRALinear`` at M = 1, 16, 4096 with and without grad, merged,
fp32 adapters on an fp16 base, ``IA3Linear``, ``BottleneckLinear``, and mixed-adapter
batches from the layer's own adapters and from an ``AdapterPool``. Numbers from
different machines are not comparable; compare two checkouts on one machine.

Prints a table; writes JSON (``--json PATH``; default ``results/host_overhead.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

# The layers' "auto" backend must choose Triton on a CPU: the interpreter flag goes on
# before triton is imported (launches are stubbed: nothing is interpreted).
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastpeft as fp  # noqa: E402

LAUNCHES = [0]


def _no_launch(self, *args, grid, warmup, **kwargs):
    """``kernel[grid](...)`` with the kernel not run: counted only."""
    LAUNCHES[0] += 1


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Within the block every Triton launch (interpreted kernels) is a counted no-op."""
    real = InterpretedFunction.run
    InterpretedFunction.run = _no_launch
    try:
        yield
    finally:
        InterpretedFunction.run = real


class OpCounter(TorchDispatchMode):
    """Counts the PyTorch operators dispatched and those that allocate a tensor (a return
    with no alias information: not a view, not an in-place or ``out=`` result). fastpeft's
    custom ops are entered with the mode still on, so the operators inside count too."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.allocs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastpeft":
            with self:  # the op's own implementation, its operators seen by this mode
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        self.ops += 1
        out = func(*args, **kwargs)
        fresh = [r.alias_info is None for r in func._schema.returns]
        outs = out if isinstance(out, (tuple, list)) and len(fresh) > 1 else (out,)
        for is_fresh, o in zip(fresh, outs):
            if is_fresh:
                self.allocs += sum(isinstance(t, torch.Tensor) for t in tree_leaves(o))
        return out


def per_call_us(cases: Dict[str, Callable[[], object]], iters: int, repeats: int) -> Dict[str, Tuple[float, float]]:
    """Per case, ``(min, median)`` over ``repeats`` rounds of the mean time of one call
    (``iters`` calls per round), in microseconds. Cases take turns within each round, so
    load from other processes falls on all alike; the minimum is the least disturbed."""
    for fn in cases.values():
        for _ in range(max(50, iters // 10)):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[name].append((time.perf_counter() - t0) / iters * 1e6)
    finally:
        gc.enable()
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def python_calls(fn: Callable[[], object]) -> int:
    """Python-level function calls of one ``fn()`` (C functions not counted)."""
    fn()
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        if event == "call":
            count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count - 1  # the case's lambda itself


def counts(fn: Callable[[], object]) -> Dict[str, int]:
    """Launches, operators and allocations of one ``fn()`` (after a warm-up call)."""
    fn()
    LAUNCHES[0] = 0
    counter = OpCounter()
    with counter:
        fn()
    return {"launches": LAUNCHES[0], "aten_ops": counter.ops, "allocs": counter.allocs}


def _peft_lora(K: int, N: int, r: int) -> nn.Module:
    import peft
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = peft.LoraConfig(r=r, lora_alpha=2 * r)
    return PeftLoraLinear(nn.Linear(K, N), "default", config=config, r=r, lora_alpha=2 * r).eval()


def build_cases(K: int, N: int, r: int, stack: contextlib.ExitStack) -> List[Dict[str, Any]]:
    """The cases: ``{"case", "M", "grad", "fn"}``; mixed batches are entered on ``stack``."""
    torch.manual_seed(0)
    lora = fp.FastLoRALinear.from_linear(nn.Linear(K, N), r=r, lora_alpha=2 * r).eval()
    merged = fp.FastLoRALinear.from_linear(nn.Linear(K, N), r=r, lora_alpha=2 * r).eval()
    merged.merge()
    half = fp.FastLoRALinear.from_linear(nn.Linear(K, N).half(), r=r, lora_alpha=2 * r).eval()
    for p in half.adapters.parameters():  # PEFT's autocast_adapter_dtype: fp32 adapters
        p.data = p.data.float()
    ia3 = fp.IA3Linear.from_linear(nn.Linear(K, N)).eval()
    bottleneck = fp.BottleneckLinear.from_linear(nn.Linear(K, N), bottleneck_size=16).eval()
    own = fp.FastLoRALinear.from_linear(nn.Linear(K, N), r=r, lora_alpha=2 * r).eval()
    own.add_adapter("b", r, 2 * r)
    stack.enter_context(fp.batch_adapters(nn.Sequential(own).eval(), ["default", "b"]))
    pooled_model = nn.Sequential(fp.FastLoRALinear.from_linear(nn.Linear(K, N), r=r, lora_alpha=2 * r)).eval()
    pool = fp.AdapterPool(pooled_model, max_adapters=2, max_rank=r)
    for name in ("p", "q"):
        pool.load(name, {"0": (torch.randn(r, K) / K**0.5, torch.randn(N, r) / r**0.5)}, lora_alpha=2 * r)
    stack.enter_context(fp.batch_adapters(pooled_model, ["p", "q"]))
    pooled = pooled_model[0]

    xs = {m: torch.randn(m, K) for m in (1, 2, 16, 4096)}
    x_half = xs[1].half()
    linear = nn.Linear(K, N).eval()
    rows: List[Dict[str, Any]] = [
        {"case": "nn.Linear", "M": 1, "grad": False, "fn": lambda: linear(xs[1])},
        {"case": "peft LoRA Linear", "M": 1, "grad": False, "fn": (lambda p: lambda: p(xs[1]))(_peft_lora(K, N, r))},
    ]
    for grad in (False, True):
        for m in (1, 16, 4096):
            rows.append({"case": "FastLoRALinear", "M": m, "grad": grad, "fn": (lambda x: lambda: lora(x))(xs[m])})
    rows += [
        {"case": "FastLoRALinear merged", "M": 1, "grad": False, "fn": lambda: merged(xs[1])},
        {"case": "FastLoRALinear fp16, fp32 adapters", "M": 1, "grad": False, "fn": lambda: half(x_half)},
        {"case": "IA3Linear", "M": 1, "grad": False, "fn": lambda: ia3(xs[1])},
        {"case": "BottleneckLinear", "M": 1, "grad": False, "fn": lambda: bottleneck(xs[1])},
        {"case": "mixed, own adapters", "M": 2, "grad": False, "fn": lambda: own(xs[2])},
        {"case": "mixed, AdapterPool", "M": 2, "grad": False, "fn": lambda: pooled(xs[2])},
    ]
    return rows


def measure(K: int, N: int, r: int, iters: int, repeats: int) -> List[Dict[str, Any]]:
    """Every case, timed and counted, with launches stubbed; ratios to ``nn.Linear``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(stubbed_launches())
        cases = build_cases(K, N, r, stack)
        results: List[Dict[str, Any]] = []
        for grad in (False, True):
            chosen = [c for c in cases if c["grad"] == grad]
            with torch.set_grad_enabled(grad):
                times = per_call_us({f"{c['case']} M={c['M']}": c["fn"] for c in chosen}, iters, repeats)
                for c in chosen:
                    t_min, t_med = times[f"{c['case']} M={c['M']}"]
                    results.append({
                        "case": c["case"], "M": c["M"], "grad": grad, "us_min": t_min, "us_median": t_med,
                        **counts(c["fn"]), "python_calls": python_calls(c["fn"]),
                    })
    base = next(r["us_min"] for r in results if r["case"] == "nn.Linear")
    for row in results:
        row["x_linear"] = row["us_min"] / base
    return results


COLUMNS = ["case", "M", "grad", "us_min", "us_median", "x_linear", "launches", "aten_ops", "allocs", "python_calls"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(64, 64), metavar=("K", "N"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tag", default="", help="a label stored with the result (e.g. before/after)")
    parser.add_argument("--json", default=str(common.RESULTS_DIR / "host_overhead.json"), help="'' to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(*args.shape, args.rank, args.iters, args.repeats)
    K, N = args.shape
    print(f"host time per forward, K={K} N={N} r={args.rank}, CPU, Triton launch stubbed "
          f"({args.tag or 'untagged'}); x_linear: us_min / nn.Linear's (M=1, same run)")
    common.print_table(rows, COLUMNS)
    payload = {
        "device_info": common.device_info(), "mode": "cpu-host-stubbed-launch", "tag": args.tag,
        "fastpeft_path": str(Path(fp.__file__).resolve().parent), "shape": [K, N], "rank": args.rank,
        "iters": args.iters, "repeats": args.repeats, "results": rows,
    }
    common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
