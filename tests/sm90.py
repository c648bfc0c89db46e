"""Compile Triton kernels for Hopper (sm_90) on a machine without a GPU, and read what
the compiler says about them.

The interpreter runs kernels on the CPU but is lenient where real hardware is not
(shared-memory limits, registers, pipelining, tensor-core instruction selection).
Triton ships its own ptxas, so every GPU launch config can still be compiled here,
ahead of time, with the same specialisations the JIT would apply at launch (pointers
16-byte aligned, unit strides folded to constants), and inspected: shared memory,
registers and spills (ptxas ``-v``), CTAs per SM, wgmma and how many wgmma groups the
main loop keeps in flight.

Compiling needs the kernels as real ``JITFunction`` objects, which they are not while
``TRITON_INTERPRET=1`` (the test session's setting): :func:`report_sm90` therefore
compiles in a child process with the interpreter off, which runs the compiles in a pool
of ``os.cpu_count()`` processes. Reports persist on disk (:func:`cache_dir`), keyed by
the kernel module's source files, this file, the spec and the Triton version, so a
rerun with unchanged kernels compiles nothing; the reports of the committed kernels are
committed too (:data:`STORE`), so a fresh clone compiles only kernels edited since. A spec is plain data::

    {"id": "bf16-128x256", "module": "fastpeft.kernels.lora",
     "kernel": "_lora_linear_fwd_kernel", "ptr_dtypes": {"x_ptr": "bf16", ...},
     "constexprs": {"BLOCK_M": 128, ...}, "unit_args": ["stride_xk"],
     "float_args": ["scaling"], "num_warps": 8, "num_stages": 3}

(extra keys, e.g. the report's labels, are carried along and ignored by the compile).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

# Shared memory per block on H100/H200 (227 KiB opt-in).
HOPPER_MAX_SHARED = 232448
# Per SM on H100/H200: registers, shared memory (1 KiB of it reserved per CTA), warps, CTAs.
HOPPER_REGS_PER_SM = 65536
HOPPER_SHARED_PER_SM = 233472
HOPPER_SHARED_RESERVED_PER_CTA = 1024
HOPPER_MAX_WARPS_PER_SM = 64
HOPPER_MAX_CTAS_PER_SM = 32
# Registers are allocated per warp in units of 256.
_REG_ALLOC_UNIT = 256

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# The keys of a spec that change what is compiled (the rest are labels).
_COMPILE_KEYS = ("module", "kernel", "ptr_dtypes", "constexprs", "unit_args", "float_args", "descriptors",
                 "num_warps", "num_stages")

Progress = Callable[[str], None]


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


def wgmma_pendings(ttgir: str) -> List[int]:
    """The ``pendings`` of every ``warp_group_dot_wait``: how many wgmma groups each wait
    leaves in flight (> 0 in a pipelined main loop; a loop that only has 0 waits for
    every MMA before the next one is issued)."""
    return [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]


def loop_wgmma_pendings(ttgir: str) -> List[int]:
    """The distinct ``pendings`` of the main loop's ``warp_group_dot_wait``s: how many
    wgmma groups each leaves in flight (a 0 waits for every MMA issued so far; in a
    flattened persistent loop the epilogue's waits count too). The main loop: the first
    innermost ``scf.for`` (by indentation) that issues wgmma; [] without one."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[i + 1:]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                break
            body.append(inner)
        text = "\n".join(body)
        if "scf.for" not in text and re.search(r"warp_group_dot\b(?!_wait)", text):
            return sorted(set(wgmma_pendings(text)))
    return []


def parse_ptxas(log: str) -> Dict[str, Any]:
    """Registers, spills and stack of one kernel from ptxas ``-v`` output, and whether
    ptxas serialised wgmma for lack of registers (its C7512 advisory)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas output:\n{log[-2000:]}")
    return {
        "regs": int(regs.group(1)),
        "stack": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
        "wgmma_serialized": "C7512" in log or "wgmma.mma_async instructions are serialized" in log,
    }


def ctas_per_sm(regs: int, shared: int, num_warps: int) -> Dict[str, Any]:
    """CTAs of one kernel resident per H100 SM, and what limits it (registers, shared
    memory, warps or the CTA cap); 0 when one CTA does not fit."""
    reg_per_warp = -(-regs * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    limits = {
        "regs": (HOPPER_REGS_PER_SM // reg_per_warp) // num_warps if reg_per_warp else HOPPER_MAX_CTAS_PER_SM,
        "smem": HOPPER_SHARED_PER_SM // (shared + HOPPER_SHARED_RESERVED_PER_CTA),
        "warps": HOPPER_MAX_WARPS_PER_SM // num_warps,
        "ctas": HOPPER_MAX_CTAS_PER_SM,
    }
    if shared > HOPPER_MAX_SHARED:
        limits["smem"] = 0
    limiter = min(limits, key=lambda k: limits[k])
    return {"ctas_per_sm": limits[limiter], "limited_by": limiter}


def _ptxas_log(compiled, captured: str) -> str:
    """ptxas ``-v`` output of ``compiled``: what the compile printed, or (a Triton cache
    hit runs no ptxas) ptxas run again on the PTX."""
    if "Used " in captured:
        return captured
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True, check=True)
    return proc.stderr + proc.stdout


def _report_one(spec: Mapping[str, Any]) -> Dict[str, Any]:
    from triton import knobs

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    knobs.nvidia.dump_ptxas_log = True  # ptxas already runs with -v: keep what it says
    num_warps = spec.get("num_warps", 4)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = compile_sm90(
                kernel,
                ptr_dtypes=spec["ptr_dtypes"],
                constexprs=spec["constexprs"],
                unit_args=spec.get("unit_args", ()),
                float_args=spec.get("float_args", ()),
                descriptors=spec.get("descriptors", {}),
                num_warps=num_warps,
                num_stages=spec.get("num_stages", 3),
            )
        ptxas = parse_ptxas(_ptxas_log(compiled, log.getvalue()))
    except Exception as exc:  # reported to the test, which fails with the message
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    shared = compiled.metadata.shared
    pendings = wgmma_pendings(compiled.asm["ttgir"])
    return {
        "shared": shared,
        "pipelined": is_pipelined(compiled),
        "wgmma": uses_wgmma(compiled),
        "wgmma_max_pendings": max(pendings, default=0),
        "wgmma_loop_pendings": loop_wgmma_pendings(compiled.asm["ttgir"]),
        "num_warps": num_warps,
        **ptxas,
        **ctas_per_sm(ptxas["regs"], shared, num_warps),
    }


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where compile reports persist: ``$FASTPEFT_SM90_CACHE`` (default
    ``~/.cache/fastpeft/sm90``). Not the tuner's ``$FASTPEFT_CACHE``, which the test
    session points at a fresh directory: a report depends only on its key."""
    root = os.environ.get("FASTPEFT_SM90_CACHE")
    return Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "fastpeft" / "sm90"


# Reports of the committed kernels, committed beside this file, so that a fresh clone
# (CI) compiles only what changed since they were written. Keys hash the kernel sources,
# so an edited kernel misses here and is compiled. ``FASTPEFT_SM90_STORE``: ``read`` (the
# default), ``off`` (compile everything not in the disk cache), ``update`` (compile what
# the disk cache lacks, ignoring the store, and add every report served to the store;
# to rewrite it: delete the file, then run the sm_90 tests with ``update``).
STORE = Path(__file__).with_name("sm90_reports.json")


def _store_mode() -> str:
    mode = os.environ.get("FASTPEFT_SM90_STORE", "read")
    if mode not in ("read", "off", "update"):
        raise ValueError(f"FASTPEFT_SM90_STORE must be read, off or update, got {mode!r}")
    return mode


def _read_store() -> Dict[str, Dict[str, Any]]:
    try:
        return json.loads(STORE.read_text())
    except (OSError, ValueError):
        return {}


def _update_store(reports: Mapping[str, Mapping[str, Any]]) -> None:
    store = _read_store()
    store.update({key: rep for key, rep in reports.items() if "error" not in rep})
    # One report a line, sorted: a kernel edit shows as a readable diff.
    lines = [f"{json.dumps(key)}: {json.dumps(rep, sort_keys=True)}" for key, rep in sorted(store.items())]
    fd, tmp = tempfile.mkstemp(dir=STORE.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, STORE)


def _module_files(module: str) -> List[Path]:
    """The source files ``module`` compiles from: its own and, transitively, the files of
    its package it imports (``from .tiles import ...``), sorted."""
    origin = Path(importlib.util.find_spec(module).origin)
    package, seen, todo = origin.parent, set(), [origin]
    while todo:
        path = todo.pop()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                todo += [package / f"{name.split('.')[0]}.py" for name in names]
    return sorted(seen)


_CACHE_MARKER = "# " + "-" * 75 + " cache"


def _compile_source() -> bytes:
    """This file's part that makes a report (compiling and reading the compiler's
    output: everything above the cache section), so that edits to the cache, the store
    or the driver below keep the reports."""
    text = Path(__file__).resolve().read_text()
    return text.split(_CACHE_MARKER, 1)[0].encode()


def _source_digest(module: str) -> str:
    """Hash of what a report of ``module``'s kernels depends on besides its spec: the
    module's source files (:func:`_module_files`), this file's compile part and the
    Triton version."""
    import triton  # the version only; cheap next to a compile

    h = hashlib.sha256(triton.__version__.encode())
    for path in _module_files(module):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(_compile_source())
    return h.hexdigest()


def spec_key(spec: Mapping[str, Any], digest: str) -> str:
    """Cache key of ``spec``: its compile-relevant part (ids and labels excluded, so
    identical compiles under two names are one) with the sources' ``digest``."""
    body = json.dumps({k: spec[k] for k in _COMPILE_KEYS if k in spec}, sort_keys=True)
    return hashlib.sha256((digest + body).encode()).hexdigest()


def _read_cached(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_cached(path: Path, report: Mapping[str, Any]) -> None:
    """Atomic write (other test sessions may share the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- driver


def _stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pytest_progress(config) -> Progress:
    """A progress callback that reaches the terminal through pytest's output capture."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def show(line: str) -> None:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            if reporter is not None:
                reporter.write_line(line)
            else:
                _stderr_progress(line)

    return show


def report_sm90(
    specs: List[Mapping[str, Any]],
    timeout: float = 1800,
    progress: Optional[Progress] = _stderr_progress,
    workers: Optional[int] = None,
) -> Dict[str, Dict[str, Any]]:
    """Compile every spec for sm_90 (interpreter off, in a child process and its pool of
    ``workers``, default ``os.cpu_count()``); reports by spec id. Reports found in the
    :func:`cache_dir` cache are not compiled again; ``progress`` gets a line now and then."""
    digests = {module: _source_digest(module) for module in {spec["module"] for spec in specs}}
    root = cache_dir()
    keys = {spec["id"]: spec_key(spec, digests[spec["module"]]) for spec in specs}
    found: Dict[str, Dict[str, Any]] = {}
    for key in set(keys.values()):
        rep = _read_cached(root / key[:2] / f"{key}.json")
        if rep is not None:
            found[key] = rep
    mode = _store_mode()
    if mode == "read":
        store = _read_store()
        found.update({key: store[key] for key in set(keys.values()) - set(found) if key in store})
    missing = {keys[s["id"]]: s for s in specs if keys[s["id"]] not in found}
    if missing:
        found.update(_compile_missing(list(missing.items()), root, timeout, progress, workers, len(set(keys.values()))))
    elif progress is not None:
        progress(f"sm_90: all {len(found)} compile reports found in {root} or {STORE.name}")
    if mode == "update":
        _update_store({key: found[key] for key in set(keys.values())})
    return {spec_id: found[key] for spec_id, key in keys.items()}


def _compile_missing(items, root: Path, timeout: float, progress: Optional[Progress], workers, total: int):
    """Run the child on ``items`` ((key, spec) pairs), streaming its results."""
    say = progress or (lambda line: None)
    workers = workers or os.cpu_count() or 1
    say(f"sm_90: compiling {len(items)} kernel configs ({total - len(items)} of {total} cached in {root}) "
        f"with {min(workers, len(items))} processes")
    env = dict(os.environ, TRITON_INTERPRET="0")
    job = {"workers": workers, "root": str(root), "items": items}
    start = last = time.monotonic()
    out: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                key, rep = json.loads(line)
                out[key] = rep
                now = time.monotonic()
                if now - last >= 15 or len(out) == len(items):
                    last = now
                    say(f"sm_90: {len(out)}/{len(items)} compiled, {now - start:.0f} s")
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode != 0 or len(out) != len(items):
            err.seek(0)
            raise RuntimeError(f"sm_90 compile process failed (or ran past {timeout:.0f} s):\n{err.read()[-4000:]}")
    return out


def _cost(spec: Mapping[str, Any]) -> int:
    """A guess at a compile's cost (big tiles take longest): the longest start first."""
    c = spec.get("constexprs", {})
    return int(c.get("BLOCK_M", 16)) * int(c.get("BLOCK_N", 16))


def _child(job: Mapping[str, Any]) -> None:
    """The child: compile ``job["items"]`` in a process pool, caching and printing each
    ``[key, report]`` as it finishes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    root = Path(job["root"])
    items = sorted(job["items"], key=lambda kv: -_cost(kv[1]))
    # Import triton and the kernels once, before forking: the workers inherit them.
    for module in sorted({spec["module"] for _, spec in items}):
        importlib.import_module(module)
    workers = max(1, min(int(job["workers"]), len(items)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(_report_one, spec): key for key, spec in items}
        for fut in as_completed(futures):
            key, rep = futures[fut], fut.result()
            if "error" not in rep:  # a failure is reported but compiled again next time
                _write_cached(root / key[:2] / f"{key}.json", rep)
            print(json.dumps([key, rep]), flush=True)


if __name__ == "__main__":
    _child(json.load(sys.stdin))
