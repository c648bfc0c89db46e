"""``fastpeft plot``: a benchmark's JSON results drawn as ratio to the cuBLAS base against M.

The benchmarks (``benchmarks/common.py``) write ``{"device_info", "mode", "results"}``;
each GPU result row holds its point's keys (``M`` and e.g. ``K``, ``N``, ``r``, ``pass``)
and, per variant ``v``, ``v_x`` (eager time / base time, same run) and ``v_graph_x``
(CUDA-graph replay). One panel per point outside M, one line per variant, log-x, the
base's 1.0 drawn.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["GROUP_KEYS", "panels", "plot_results", "main"]

# The keys that name a benchmark point besides M (a panel per combination present).
GROUP_KEYS = ("pass", "K", "N", "r", "adapters", "dist", "ranks", "dtype")


def _ratio_suffix(graph: bool) -> str:
    return "_graph_x" if graph else "_x"


def _variants(rows: Sequence[Mapping[str, Any]], graph: bool) -> List[str]:
    suffix, names = _ratio_suffix(graph), []
    for row in rows:
        for key, value in row.items():
            if not key.endswith(suffix) or (not graph and key.endswith("_graph_x")):
                continue
            name = key[: -len(suffix)]
            if isinstance(value, (int, float)) and name not in names:
                names.append(name)
    return names


def panels(rows: Sequence[Mapping[str, Any]], graph: bool = False) -> Dict[Tuple, Dict[str, List[Tuple[int, float]]]]:
    """``{point key: {variant: [(M, ratio), ...] sorted by M}}`` over the rows that
    have an ``M`` and at least one ratio."""
    suffix = _ratio_suffix(graph)
    out: Dict[Tuple, Dict[str, List[Tuple[int, float]]]] = {}
    for name in _variants(rows, graph):
        for row in rows:
            value = row.get(name + suffix)
            if "M" not in row or not isinstance(value, (int, float)):
                continue
            key = tuple((k, row[k]) for k in GROUP_KEYS if k in row)
            out.setdefault(key, {}).setdefault(name, []).append((int(row["M"]), float(value)))
    for lines in out.values():
        for points in lines.values():
            points.sort()
    return out


def _title(key: Tuple) -> str:
    return " ".join(f"{k}={v}" if k != "pass" else str(v) for k, v in key) or "all points"


def plot_results(payload: Mapping[str, Any], out: Path, graph: bool = False,
                 variants: Optional[Sequence[str]] = None) -> Path:
    """Draw ``payload`` (a benchmark's JSON) into ``out`` (PNG); raise ``ValueError``
    when it holds no ratios (a CPU correctness-only run has none)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    groups = panels(payload.get("results", []), graph)
    if variants:
        groups = {k: {v: pts for v, pts in lines.items() if v in variants} for k, lines in groups.items()}
        groups = {k: lines for k, lines in groups.items() if lines}
    if not groups:
        mode = payload.get("mode")
        why = " (a CPU correctness-only run has no timings)" if mode == "cpu-correctness" else ""
        kind = "CUDA-graph ratios (*_graph_x)" if graph else "ratios (*_x)"
        raise ValueError(f"no {kind} against M in these results{why}")
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (key, lines) in zip(axes.flat, groups.items()):
        for name, points in lines.items():
            ms, ratios = zip(*points)
            ax.plot(ms, ratios, marker="o", label=name)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="base (cuBLAS)")
        ax.set_xscale("log", base=2)
        ms_all = sorted({m for points in lines.values() for m, _ in points})
        ax.set_xticks(ms_all, [str(m) for m in ms_all])
        ax.minorticks_off()
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("time / base time")
        ax.set_title(_title(key), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    info = payload.get("device_info", {})
    fig.suptitle(f"{info.get('device', '?')}  ({info.get('date_utc', '')}, {'CUDA graph' if graph else 'eager'})",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastpeft plot",
        description=(
            "Draw a benchmark's JSON results as a PNG: each variant's time as a ratio to the cuBLAS\n"
            "base GEMM of the same run (below 1.0 is faster than the base alone), against M on a\n"
            "log scale, one panel per shape (and rank, pass, ...), one line per variant.\n"
            "Needs matplotlib (pip install matplotlib)."
        ),
        epilog="example:\n  fastpeft plot benchmarks/results/2026-12-02_NVIDIA_H200/bench_lora.json --graph",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("json", help="a JSON file written by a benchmark program")
    parser.add_argument("-o", "--output", default=None, help="the PNG to write (default: beside the JSON, .png)")
    parser.add_argument("--graph", action="store_true", help="plot the CUDA-graph replay ratios instead of eager")
    parser.add_argument("--variants", default=None, help="comma-separated variants to draw (default: all)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    path = Path(args.json)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"fastpeft plot: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    suffix = "_graph.png" if args.graph else ".png"
    out = Path(args.output) if args.output else path.with_name(path.stem + suffix)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fastpeft plot: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    try:
        plot_results(payload, out, args.graph, args.variants.split(",") if args.variants else None)
    except ValueError as exc:
        print(f"fastpeft plot: {path}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
