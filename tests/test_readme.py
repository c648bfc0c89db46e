"""Every ```python block of README.md runs as written.

Each block is self-contained (its own imports and tiny model, nothing downloaded, the
device picked with ``torch.cuda.is_available()``) and runs on its own: in a fresh
namespace and an empty working directory, so a reader can copy any one block. They run in
one child Python, as a user's would: without the test suite's ``TRITON_INTERPRET=1`` (on
a CPU the PyTorch reference runs, on a GPU the compiled kernels). Blocks of other
languages (``bash``) are not run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

# Runs each block (argv[1]: a JSON list of [title, code]) in its own directory under
# argv[2]; stops at the first failure with the block's title and traceback.
RUNNER = r"""
import json, os, sys, traceback, warnings
warnings.simplefilter("ignore")
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
for i, (title, code) in enumerate(blocks):
    os.chdir(os.path.join(sys.argv[2], str(i)))
    try:
        exec(compile(code, f"README.md block {i} [{title}]", "exec"), {"__name__": "__readme__"})
    except BaseException:
        sys.stderr.write(f"README block {i} [{title}] failed:\n{traceback.format_exc()}")
        sys.exit(1)
    print(f"block {i} ok", flush=True)
"""


def python_blocks():
    """``[section title, code]`` of each python block, in order."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    blocks = []
    for match in FENCE.finditer(text):
        titles = re.findall(r"^#+ (.*)$", text[: match.start()], re.M)
        blocks.append([titles[-1] if titles else "top", match.group(1)])
    return blocks


def test_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 6
    assert "get_peft_model" in blocks[0][1]  # the PEFT user's entry point comes first
    for title, code in blocks:
        assert '"cuda"' not in code or "torch.cuda.is_available()" in code, title
        assert "from_pretrained(\"" not in code.replace("FastPeftModel.from_pretrained", ""), title  # no downloads


def test_readme_blocks_run(tmp_path):
    blocks = python_blocks()
    for i in range(len(blocks)):
        (tmp_path / str(i)).mkdir()
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the fastpeft this suite tests
    env["HF_HUB_OFFLINE"] = "1"  # a download attempt fails instead of reaching the network
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec), str(tmp_path)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" ok\n") == len(blocks), proc.stdout
    assert "False" not in proc.stdout, proc.stdout  # the checks the blocks print (e.g. same outputs: True)
