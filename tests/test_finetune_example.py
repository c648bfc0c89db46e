"""``examples/finetune.py`` end to end: a few steps of the plain loop and of the Hugging
Face Trainer on the tiny config model, each in its own process (TRITON_INTERPRET=1 is
inherited from conftest, so the fused kernels train), and the saved adapter reloaded
here by ``peft`` with the logits of fastpeft's own reload; plus the argument checks."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import fastpeft as fp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune.py")
TINY_RUN = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lora-r", "4", "--target-modules", "q_proj",
            "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, trainer: str) -> tuple:
    out, report = tmp_path / "adapter", tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--trainer", trainer, "--output-dir", str(out), "--json", str(report), *TINY_RUN],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(report.read_text()), proc.stdout + proc.stderr


def _check_adapter_reloads_in_peft(example, out, report) -> None:
    from peft import PeftModel

    def base():
        return example.build_model("tiny", report["vocab_size"], torch.float32, torch.device("cpu"), 0).eval()

    ids = torch.randint(0, report["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    theirs = PeftModel.from_pretrained(base(), str(out))
    mine = base()
    fp.load_adapter(mine, str(out))
    with torch.no_grad():
        got, want, plain = theirs(input_ids=ids).logits, mine(input_ids=ids).logits, base()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, plain, atol=1e-6), "the saved adapter does nothing: training did not happen"


@pytest.mark.parametrize("trainer", ["loop", "hf"])
def test_example_trains_saves_and_peft_reloads(example, tmp_path, trainer):
    out, report, log = _run(tmp_path, trainer)
    assert "fastpeft (triton)" in log, "the run did not use the Triton kernels"
    assert len(report["losses"]) == 3 and all(map(lambda v: v == v and v > 0, report["losses"]))
    assert len(report["step_s"]) == 3 and report["mean_step_s"] > 0
    assert report["reload_ok"] is True and "reloaded in peft" in log
    per_step = "step    3  loss" if trainer == "loop" else "'loss'"
    assert log.count(per_step) >= 1, log[-2000:]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    _check_adapter_reloads_in_peft(example, out, report)


def test_example_under_torchrun_with_fsdp2(tmp_path):
    """2 processes (gloo), FSDP2: rank 0 alone reports and writes the adapter, gathered
    from the shards, and peft reloads it. The ops run as the PyTorch reference here
    (TRITON_INTERPRET=0): tests/test_distributed.py runs the kernels under FSDP2."""
    out, report = tmp_path / "adapter", tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "TRITON_INTERPRET": "0",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, "--fsdp",
         "--output-dir", str(out), "--json", str(report), *TINY_RUN],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["fsdp"] and data["reload_ok"] is True
    assert proc.stdout.count("reloaded in peft") == 1 and proc.stdout.count("step    3  loss") == 1
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (["--fsdp", "--trainer", "hf"], "--trainer loop"),
    (["--steps", "0"], "--steps must be positive"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--dataset", "wikitext"], "needs a tokenizer"),
])
def test_bad_arguments_are_clear_errors(example, capsys, argv, message):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_names_every_mode(example):
    text = example.build_parser().format_help()
    for flag in ("--model", "--dataset", "--trainer", "--peft", "--fsdp", "--json", "llama-1b-config"):
        assert flag in text


def test_1b_config_has_llama_1b_shapes(example):
    model = example.build_model("llama-1b-config", 100, torch.bfloat16, torch.device("meta"), 0)
    n = sum(p.numel() for p in model.parameters())
    assert 1.2e9 < n < 1.3e9, n  # Llama-3.2-1B: 1.24B parameters (tied embeddings)


class _FakeTokenizer:
    eos_token_id = 1

    def __call__(self, text):
        return {"input_ids": [2 + len(w) for w in text.split()]}

    def __len__(self):
        return 50


class _FakeSplit(dict):
    @property
    def column_names(self):
        return list(self)


def test_dataset_text_column_is_tokenized_into_blocks(example, monkeypatch):
    """The --dataset path (no download here): the text column, tokenized, joined with
    EOS and cut into --seq-len blocks; empty lines are skipped; a wrong column is named."""
    import types

    import transformers

    rows = ["a bb ccc", "", "dddd eeeee", "ff g"] * 4
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: _FakeSplit(text=rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: _FakeTokenizer())
    args = example.parse_args(["--model", "some/model", "--dataset", "some/data", "--seq-len", "4"])
    blocks, vocab = example.load_data(args, needed=3)
    stream = [3, 4, 5, 1, 6, 7, 1, 4, 3, 1]
    assert vocab == 50 and blocks.shape[1] == 4 and blocks.shape[0] >= 3
    assert blocks.flatten().tolist() == (stream * 2)[: blocks.numel()]
    with pytest.raises(SystemExit, match="no column 'body'"):
        example.load_data(example.parse_args(["--model", "m", "--dataset", "d", "--text-column", "body"]), 3)
