"""Shared helpers of the microbenchmarks: timing, device facts, tables and JSON.

Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs); at small M
``bench_graph_ms`` also times the same call replayed from a captured CUDA graph, which
removes the Python launch path. Every benchmark reports each variant as a ratio to the
cuBLAS base GEMM measured in the same run, never against numbers from another run.

On a machine without a CUDA GPU the benchmarks run a small correctness-only pass under
the Triton interpreter: ``setup_interpreter()`` must run before triton is imported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    """True when a CUDA GPU runs the compiled kernels (not the interpreter)."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def setup_interpreter() -> bool:
    """On a machine without CUDA, turn the Triton interpreter on; returns ``on_gpu()``.

    Must run before ``triton`` is imported (the interpreter flag is read at import).
    """
    if not torch.cuda.is_available():
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("setup_interpreter() must run before triton is imported")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return on_gpu()


def bench_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds (eager: Python launch path included)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_graph_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` replayed from a captured CUDA graph, in milliseconds.

    ``fn`` runs a few times on a side stream first (to compile and tune every kernel it
    launches) and is then captured once; the timing replays the graph, so Python, the
    dispatcher and the autotuner's cache lookups are not counted.
    """
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median"))


def device_info() -> Dict[str, Any]:
    """The card, date and software versions to store beside every result."""
    info: Dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["cuda"] = torch.version.cuda
        info["capability"] = f"{props.major}.{props.minor}"
        info["sms"] = props.multi_processor_count
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}), no CUDA GPU"
    return info


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; missing cells print '-'."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    print(format_table(rows, columns), flush=True)


def progress(points: Sequence[Any], desc: str) -> Iterable[Any]:
    """``points`` with a progress bar on the terminal (none when stderr is not one, as
    in gpu_check.sh's logs); print per-point lines with :func:`say` so they do not break it."""
    from tqdm.auto import tqdm

    return tqdm(list(points), desc=desc, unit="point", disable=None, dynamic_ncols=True)


def say(line: str) -> None:
    """Print one line above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def write_json(path: Optional[str], payload: Mapping[str, Any], quiet: bool = False) -> Optional[Path]:
    """Write ``payload`` (plus nothing else) as indented JSON; ``None`` path: skip."""
    if not path:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    if not quiet:
        print(f"wrote {out}", flush=True)
    return out


def write_partial(path: Optional[str], info: Mapping[str, Any], quick: bool, rows: List[Dict[str, Any]]) -> None:
    """The results so far, after every point: a run cut short by a time limit keeps
    what it measured (``complete`` is False until the final write)."""
    mode = "quick" if quick else "full"
    write_json(path, {"device_info": info, "mode": mode, "complete": False, "results": rows}, quiet=True)


def base_args(description: str, default_json: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: ``--quick`` (fewer points) and ``--json PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and M values (a few minutes on a GPU)")
    parser.add_argument(
        "--json",
        default=str(RESULTS_DIR / default_json),
        help="where to write the JSON results ('' to skip); default: %(default)s",
    )
    return parser


def ratio(t: Optional[float], base: Optional[float]) -> Optional[float]:
    """``t / base`` or None when either is missing."""
    if t is None or base is None or base <= 0:
        return None
    return t / base


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN/inf in ``out``: inf)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff if denom == 0 else diff / denom


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Raise when ``out`` is not within ``tol`` of ``ref``: nothing is timed unchecked."""
    err = max_rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; refusing to time a wrong result")
    return err


def measure_variants(
    row: Dict[str, Any],
    fns: Mapping[str, Callable[[], torch.Tensor]],
    ref_for: Callable[[str], torch.Tensor],
    tol: float,
    with_graph: bool,
    skip: Callable[[str], Optional[str]] = lambda name: None,
    **timing: Any,
) -> None:
    """Check, then time, every variant of one benchmark point, into ``row``.

    ``fns["base"]`` is the cuBLAS base (timed, never checked); every other variant is
    checked against ``ref_for(name)`` within ``tol`` before it is timed. Writes
    ``<name>_err``, ``<name>_ms``, ``<name>_graph_ms`` (``with_graph``), and the ratios
    ``<name>_x`` / ``<name>_graph_x`` to the base of the same run. A variant that fails its
    check, or that ``skip(name)`` rules out (returning why), gets ``<name>_error`` and
    is not timed; the others go on. Run under ``torch.no_grad()``.
    """
    for name, fn in fns.items():
        why = skip(name)
        if why:
            row[f"{name}_error"] = why
            continue
        if name != "base":
            try:
                row[f"{name}_err"] = check_close(name, fn(), ref_for(name), tol)
            except Exception as exc:  # report a failing variant, keep measuring the others
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
        row[f"{name}_ms"] = bench_ms(fn, **timing)
        if with_graph:
            try:
                row[f"{name}_graph_ms"] = bench_graph_ms(fn, **timing)
            except Exception as exc:
                row[f"{name}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for name in fns:
        if name != "base":
            row[f"{name}_x"] = ratio(row.get(f"{name}_ms"), row.get("base_ms"))
            row[f"{name}_graph_x"] = ratio(row.get(f"{name}_graph_ms"), row.get("base_graph_ms"))


def saved_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor]) -> int:
    """Activation bytes autograd keeps for the backward of ``fn()`` (each storage once,
    parameters left out)."""
    skip = {q.untyped_storage().data_ptr() for q in params}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def env_summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Payload head shared by all benchmarks."""
    return {"device_info": device_info(), "results": rows}


def run_benchmark(
    args: argparse.Namespace,
    *,
    what: str,
    run_cpu: Callable[[], List[Dict[str, Any]]],
    cpu_columns: Sequence[str],
    run_gpu: Callable[[Dict[str, Any]], List[Dict[str, Any]]],
    gpu_columns: Sequence[str],
    key_columns: Sequence[str],
    title: str,
    more_tables: Sequence[Tuple[str, Sequence[str], Callable[[Dict[str, Any]], bool]]] = (),
) -> int:
    """The common flow of a benchmark program: say where it runs; without a GPU run the
    correctness-only pass of ``what``, else ``run_gpu(device_info)``; print the table,
    any ``more_tables`` (title, columns, row filter), every recorded ``*_error`` (named
    by ``key_columns``), and write the JSON."""
    info = device_info()
    print(f"device: {info['device']}  torch {info['torch']}  triton {info.get('triton')}", flush=True)
    if not on_gpu():
        print(f"no CUDA GPU: running a correctness-only pass of {what} under the interpreter (no timings)")
        rows = run_cpu()
        print_table(rows, cpu_columns)
        write_json(args.json, {"device_info": info, "mode": "cpu-correctness", "results": rows})
        return 0
    rows = run_gpu(info)
    print(f"\n{title}")
    print_table(rows, gpu_columns)
    for more_title, columns, keep in more_tables:
        kept = [row for row in rows if keep(row)]
        if kept:
            print(f"\n{more_title}")
            print_table(kept, columns)
    for row in rows:
        for key, value in row.items():
            if key.endswith("_error"):
                print("error:", *(row.get(c) for c in key_columns), key, value)
    mode = "quick" if getattr(args, "quick", False) else "full"
    write_json(args.json, {"device_info": info, "mode": mode, "complete": True, "results": rows})
    return 0
