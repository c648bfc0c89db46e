"""kernels/ stands alone: no kernel file imports fastpeft above it, nor another kernel
file's private (underscore) names; shared things are public names of runtime, autotune
and tiles."""
from __future__ import annotations

import ast
from pathlib import Path

import fastpeft.kernels as kernels

KERNEL_FILES = sorted(Path(kernels.__file__).parent.glob("*.py"))


def _kernel_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").startswith("fastpeft.kernels")


def test_kernels_import_nothing_above_them():
    for path in KERNEL_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith("fastpeft") and not n.startswith("fastpeft.kernels")]
            assert not bad, f"{path.name} imports {bad}"


def test_no_kernel_file_reaches_into_another_ones_private_names():
    for path in KERNEL_FILES:
        tree = ast.parse(path.read_text())
        modules = set()  # local names bound to other kernel modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _kernel_module(node):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
                modules |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert not node.attr.startswith("_"), f"{path.name} reads {node.value.id}.{node.attr}"
