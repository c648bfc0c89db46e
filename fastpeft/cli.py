"""The ``fastpeft`` command: one entry point, one subcommand per job.

``COMMANDS`` is the table of subcommands. Each row names a function ``main(argv) -> int``
(imported only when its command runs) that parses its
own arguments; adding a command is one row.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["COMMANDS", "BENCHMARKS", "Command", "Benchmark", "main", "bench_main", "benchmarks_dir"]


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str  # "module:function", the function taking argv and returning an exit code


COMMANDS: Sequence[Command] = (
    Command("selfcheck", "check the kernels on this machine against the reference (and time them on a GPU)",
            "fastpeft.selfcheck:main"),
    Command("bench", "run a benchmark program of the repository (lora, adapters, multi, ...)",
            "fastpeft.cli:bench_main"),
    Command("plot", "draw a benchmark's JSON results as a PNG (ratio to the cuBLAS base against M)",
            "fastpeft.bench_plot:main"),
    Command("methods", "compare the PEFT methods on a model config: trainable parameters, merging, kernels",
            "fastpeft.method_table:main"),
    Command("tune", "pre-tune the kernels of a model and its adapters for given batch sizes (cached on disk)",
            "fastpeft.tuning:main"),
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    program: str  # file name in the repository's benchmarks/ folder
    summary: str


BENCHMARKS: Sequence[Benchmark] = (
    Benchmark("lora", "bench_lora.py", "fused LoRA vs the cuBLAS base, unfused PyTorch, PEFT's layer, torch.compile"),
    Benchmark("adapters", "bench_adapters.py", "fused (IA)^3 and bottleneck layers vs the base and unfused PyTorch"),
    Benchmark("multi", "bench_multi.py", "mixed-adapter batches vs a PEFT-style loop and gather + bmm"),
    Benchmark("adalora", "bench_adalora.py", "AdaLoRA layers (forward, forward + backward) vs unfused and PEFT"),
    Benchmark("dora", "bench_dora.py", "fused DoRA (eval, mixed batch, training step) vs PEFT's DoRA layer"),
    Benchmark("train", "bench_train.py", "a LoRA layer's training step vs the frozen base, unfused, compile, PEFT"),
    Benchmark("decode", "bench_decode.py", "ServingEngine decode: eager steps vs CUDA-graph replay"),
    Benchmark("host", "host_overhead.py", "Python time per layer call (launch path), no GPU needed"),
)


def _plain_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30)


def _commands_text() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"  {c.name.ljust(width)}  {c.summary}" for c in COMMANDS]
    return "commands:\n" + "\n".join(lines) + "\n\nRun 'fastpeft COMMAND --help' for the options of one command."


def _run_target(target: str, argv: List[str]) -> int:
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="fastpeft",
        description="fastpeft: Triton-kernel PEFT (LoRA and relatives) with Hugging Face PEFT's checkpoints.",
        epilog=_commands_text(),
        formatter_class=_plain_formatter,
    )
    parser.add_argument("command", choices=[c.name for c in COMMANDS], metavar="COMMAND", help="what to run (see below)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    if not argv:
        parser.print_help()
        return 2
    args = parser.parse_args(argv[:1])
    command = next(c for c in COMMANDS if c.name == args.command)
    return _run_target(command.target, argv[1:])


# ------------------------------------------------------------------------- bench


def benchmarks_dir(explicit: Optional[str] = None) -> Path:
    """The repository's ``benchmarks/`` folder: ``explicit``, else the one beside the
    package's source tree (an editable install or a checkout on ``PYTHONPATH``)."""
    if explicit:
        return Path(explicit)
    import fastpeft

    return Path(fastpeft.__file__).resolve().parent.parent / "benchmarks"


def _bench_list() -> str:
    width = max(len(b.name) for b in BENCHMARKS)
    return "benchmarks:\n" + "\n".join(f"  {b.name.ljust(width)}  {b.summary} ({b.program})" for b in BENCHMARKS)


def bench_main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastpeft bench NAME [options of the program]``: run one program of the
    repository's benchmarks/ folder with this Python, passing the options on."""
    names: Dict[str, Benchmark] = {b.name: b for b in BENCHMARKS}
    parser = argparse.ArgumentParser(
        prog="fastpeft bench",
        description=(
            "Run one of the repository's benchmark programs. Each prints a table and writes JSON\n"
            "(under benchmarks/results/ unless --json says otherwise); the GPU sweeps take --quick\n"
            "and, on a machine without a CUDA GPU, run a short correctness-only pass instead.\n"
            "The programs live in the repository, not in the installed package: install fastpeft\n"
            "from a checkout (pip install -e .) or point --dir at a checkout's benchmarks folder."
        ),
        epilog=_bench_list() + "\n\nexample:\n  fastpeft bench lora --quick --json out/lora.json\n"
                               "  fastpeft bench lora --help    (the program's own options)",
        formatter_class=_plain_formatter,
    )
    parser.add_argument("name", metavar="NAME", help="which benchmark (see the list below)")
    parser.add_argument("--dir", default=None, help="the benchmarks folder to run from (default: the checkout's)")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed on to the program")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    bench = names.get(args.name)
    if bench is None:
        parser.error(f"unknown benchmark {args.name!r}; choose from: {', '.join(names)}")
    folder = benchmarks_dir(args.dir)
    program = folder / bench.program
    if not folder.is_dir():
        print(f"fastpeft bench: no benchmarks folder at {folder}. The benchmark programs are part of the "
              "repository, not of the installed package: run from a checkout (pip install -e .) or pass "
              "--dir PATH/TO/benchmarks.", file=sys.stderr)
        return 2
    if not program.is_file():
        print(f"fastpeft bench: benchmark {bench.name!r} needs {bench.program}, which {folder} does not have "
              "(this checkout may predate it).", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(program), *args.options])


if __name__ == "__main__":
    sys.exit(main())
