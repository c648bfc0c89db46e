"""Host (Python) time per forward of ``FastLoRALinear`` on the eager decode path.

What it measures: one ``layer(x)`` call at M = 1 in eval mode under ``torch.no_grad()``
with the Triton launch *stubbed out* (``fastpeft.kernels.lora.lora_linear_fwd`` returns
an empty output), so only the work fastpeft does in Python before and after the kernel
is timed: attribute lookups, checks, autocast, dispatch. It is reported as a ratio to
``nn.Linear``'s own host time at the same shape, measured in the same run (small shapes,
so that ``nn.Linear`` is dominated by its dispatch too), and as the number of Python
function calls per forward (exact, whatever the machine's load). Also the merged layer (plain
``F.linear`` behind fastpeft's forward) and a mixed batch of one row per adapter.

Runs on any machine and any fastpeft layout that has ``fp.FastLoRALinear`` and that
launcher; use it to compare two checkouts on one machine (numbers from different
machines are not comparable). Prints a table; writes JSON (``--json PATH``; default
``benchmarks/results/host_overhead.json``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

# The layer's "auto" backend must choose Triton on a CPU: turn the interpreter flag on
# before triton is imported (the launch itself is stubbed, nothing is interpreted).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fastpeft as fp  # noqa: E402
from fastpeft.kernels import lora as lora_kernels  # noqa: E402
from fastpeft.kernels import multi_lora as multi_kernels  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _stub_launch(x, weight, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _per_call_us(cases: Dict[str, Callable[[], object]], iters: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Per case, the mean time of one call over ``iters`` calls, in microseconds: the
    minimum and the median over ``repeats`` rounds. The cases take turns within each
    round, so load from other processes falls on all of them alike; the minimum is the
    figure least disturbed by it (as ``timeit`` advises)."""
    for fn in cases.values():
        for _ in range(max(100, iters // 10)):
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
    return {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()}


def _python_calls(fn: Callable[[], object]) -> int:
    """Python-level function calls one ``fn()`` makes (C functions not counted): a count
    of host work that, unlike a time, does not move with the machine's load."""
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
    return count - 1  # the lambda itself


def measure(K: int, N: int, r: int, iters: int, repeats: int, device: str) -> List[Dict[str, object]]:
    torch.manual_seed(0)
    linear = nn.Linear(K, N, device=device).eval()
    layer = fp.FastLoRALinear.from_linear(nn.Linear(K, N, device=device), r=r, lora_alpha=2 * r).eval()
    merged = fp.FastLoRALinear.from_linear(nn.Linear(K, N, device=device), r=r, lora_alpha=2 * r).eval()
    merged.merge()
    x = torch.randn(1, K, device=device)
    x2 = torch.randn(2, K, device=device)
    mixed = fp.FastLoRALinear.from_linear(nn.Linear(K, N, device=device), r=r, lora_alpha=2 * r).eval()
    mixed.add_adapter("b", r, 2 * r)
    mixed.row_adapters = ["default", "b"]  # a mixed batch over this layer alone
    cases = {
        "nn.Linear": lambda: linear(x),
        "FastLoRALinear": lambda: layer(x),
        "FastLoRALinear merged": lambda: merged(x),
        "FastLoRALinear mixed (2 rows)": lambda: mixed(x2),
    }
    with torch.no_grad():
        times = _per_call_us(cases, iters, repeats)
        calls = {name: _python_calls(fn) for name, fn in cases.items()}
    base = times["nn.Linear"]["min"]
    return [
        {"case": name, "us_min": t["min"], "us_median": t["median"], "ratio_to_linear": t["min"] / base,
         "python_calls": calls[name]}
        for name, t in times.items()
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(64, 64), metavar=("K", "N"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="", help="a label stored with the result (e.g. before/after)")
    parser.add_argument("--json", default=str(RESULTS / "host_overhead.json"))
    args = parser.parse_args(argv)
    lora_kernels.lora_linear_fwd = _stub_launch  # the launch, stubbed: host work only
    multi_kernels.multi_lora_linear_fwd = _stub_launch
    torch.set_num_threads(1)
    rows = measure(*args.shape, args.rank, args.iters, args.repeats, args.device)
    print(f"host time per call, M=1, K={args.shape[0]} N={args.shape[1]} r={args.rank}, {args.device}, "
          f"Triton launch stubbed ({args.tag or 'untagged'})")
    print(f"{'case':32s} {'us min':>8s} {'us median':>10s} {'min x nn.Linear':>16s} {'python calls':>13s}")
    for row in rows:
        print(f"{row['case']:32s} {row['us_min']:8.2f} {row['us_median']:10.2f} {row['ratio_to_linear']:16.2f} "
              f"{row['python_calls']:13d}")
    payload = {
        "tag": args.tag, "fastpeft_path": str(Path(fp.__file__).resolve().parent), "torch": torch.__version__,
        "python": sys.version.split()[0], "shape": list(args.shape), "rank": args.rank, "device": args.device,
        "iters": args.iters, "repeats": args.repeats, "rows": rows,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
