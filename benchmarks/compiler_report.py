"""Compiler report: every tuner candidate of every kernel, compiled for Hopper (sm_90).

No GPU needed: Triton compiles ahead of time with its bundled ptxas (tests/sm90.py), in
bf16 and fp16, each candidate in the variants the tuner runs it in (tests/sm90_specs.py
enumerates them from kernels/autotune.py's lists). Per kernel config it prints:

* ``regs``: registers per thread; ``spill``: bytes of spill stores/loads (0/0: none);
* ``smem_kib``: shared memory per CTA (Hopper allows 227 KiB);
* ``ctas``: CTAs resident per SM, from registers, shared memory and warps against an
  H100's 64K registers, 228 KiB and 64 warps per SM (``by``: what limits it);
* ``wgmma``: the dots run as Hopper warpgroup MMAs; ``in_flight``: the most wgmma groups
  a ``warp_group_dot_wait`` leaves pending; ``loop_waits``: the pendings of the main
  loop's waits (a 0 there: a K step waits for all its MMAs before the next is issued);
  ``serial``: ptxas serialised the wgmmas for lack of registers (its C7512 advisory);
* ``pipelined``: the main loop's loads are asynchronous (cp.async or TMA).

Reports are cached on disk (``$FASTPEFT_SM90_CACHE``, default ``~/.cache/fastpeft/sm90``)
by kernel source, spec and Triton version; ``tests/test_compiler_report.py`` fails when
a tuned candidate spills or overflows shared memory. Writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import RESULTS_DIR, device_info, format_table, write_json  # noqa: E402

COLUMNS = ["kernel", "dtype", "config", "variant", "regs", "spill", "smem_kib", "ctas", "by", "wgmma", "in_flight",
           "loop_waits", "serial", "pipelined"]


def rows(specs: Sequence[Mapping[str, Any]], reports: Mapping[str, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One table row per spec (the report's numbers beside the spec's labels)."""
    out = []
    for spec in specs:
        rep = reports[spec["id"]]
        row: Dict[str, Any] = {k: spec.get(k) for k in ("id", "dtype", "config", "variant", "tuned")}
        row["kernel"] = spec.get("kernel_name", spec["kernel"])
        if "error" in rep:
            row["error"] = rep["error"]
            out.append(row)
            continue
        row.update(rep)
        row["spill"] = f"{rep['spill_stores']}/{rep['spill_loads']}"
        row["smem_kib"] = round(rep["shared"] / 1024, 1)
        row["ctas"], row["by"] = rep["ctas_per_sm"], rep["limited_by"]
        row["in_flight"] = rep["wgmma_max_pendings"] if rep["wgmma"] else None
        row["loop_waits"] = ",".join(map(str, rep["wgmma_loop_pendings"])) or None
        row["serial"] = rep["wgmma_serialized"] or None
        out.append(row)
    return out


def problems(table: Sequence[Mapping[str, Any]]) -> Dict[str, List[str]]:
    """Rows that failed to compile, spill, or need more shared memory than a CTA may have."""
    from sm90 import HOPPER_MAX_SHARED

    return {
        "errors": [r["id"] for r in table if "error" in r],
        "spills": [r["id"] for r in table if r.get("spill_stores") or r.get("spill_loads")],
        "over_smem": [r["id"] for r in table if r.get("shared", 0) > HOPPER_MAX_SHARED],
    }


def summary(table: Sequence[Mapping[str, Any]]) -> str:
    """A few lines: how many configs, register and shared-memory ranges per kernel, and
    every row that spills, overflows shared memory or fails."""
    lines = [f"{len(table)} kernel configs compiled for sm_90"]
    for kernel in sorted({r["kernel"] for r in table}):
        ok = [r for r in table if r["kernel"] == kernel and "error" not in r]
        if ok:
            lines.append(
                f"  {kernel}: {len(ok)} configs, regs {min(r['regs'] for r in ok)}-{max(r['regs'] for r in ok)}, "
                f"smem {min(r['smem_kib'] for r in ok)}-{max(r['smem_kib'] for r in ok)} KiB, "
                f"CTAs/SM {min(r['ctas'] for r in ok)}-{max(r['ctas'] for r in ok)}, "
                f"wgmma serialised in {sum(bool(r['serial']) for r in ok)}"
            )
    for name, ids in problems(table).items():
        lines.append(f"  {name}: {len(ids)}" + ("" if not ids else ": " + ", ".join(ids)))
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true",
                        help="also the configs the sm_90 tests check beyond the tuned ones (fp32 inputs, "
                             "fp32 adapters, backward layouts)")
    parser.add_argument("--kernel", action="append", default=[], help="only this kernel (repeatable), e.g. bottleneck")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", default=str(RESULTS_DIR / "compiler_report_sm90.json"),
                        help="where to write the JSON ('' to skip); default: %(default)s")
    args = parser.parse_args(list(argv) or None)

    import sm90
    import sm90_specs

    specs = sm90_specs.catalogue() if args.all else sm90_specs.tuned_specs()
    if args.kernel:
        specs = [s for s in specs if s.get("kernel_name") in args.kernel]
    start = time.monotonic()
    reports = sm90.report_sm90(specs, workers=args.workers)
    table = rows(specs, reports)
    print(format_table(table, COLUMNS))
    print(summary(table))
    print(f"({time.monotonic() - start:.0f} s; cache: {sm90.cache_dir()})")
    write_json(args.json, {"device_info": device_info(), "target": "sm_90 (compiled ahead of time, no GPU)",
                           "problems": problems(table), "results": table})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
