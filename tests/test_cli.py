"""The ``fastpeft`` command: help texts, ``methods`` against peft's counts, ``plot``,
``bench`` (running a program, and the errors when one is missing), ``selfcheck``."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fastpeft import cli, method_table
from tiny_models import tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
REST_MARKUP = re.compile(r"``|:(func|class|mod|meth|data):`")


def _run(capsys, argv):
    """``fastpeft ARGV`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [[], ["selfcheck"], ["bench"], ["plot"], ["methods"]],
                         ids=["fastpeft", "selfcheck", "bench", "plot", "methods"])
def test_help_exits_0_in_plain_words(capsys, argv):
    code, out, err = _run(capsys, [*argv, "--help"])
    assert code == 0, err
    assert out.startswith("usage: fastpeft"), out[:80]
    assert not REST_MARKUP.search(out), out
    if not argv:
        assert all(c.name in out for c in cli.COMMANDS)
    if argv == ["bench"]:
        assert all(b.name in out and b.program in out for b in cli.BENCHMARKS)


def test_selfcheck_entry_point_help_is_plain(capsys):
    from fastpeft import selfcheck

    with pytest.raises(SystemExit) as exc:
        selfcheck.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--quick" in out
    assert not REST_MARKUP.search(out), out


def _table(out: str) -> dict:
    """``{method: trainable}`` from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    rows = {}
    for line in lines[start + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = int(cells[2].replace(",", ""))
    return rows


def _peft_configs(rank: int, tokens: int, layers: int):
    import peft

    return {
        "lora": peft.LoraConfig(r=rank, lora_alpha=2 * rank),
        "ia3": peft.IA3Config(),
        "adalora": peft.AdaLoraConfig(init_r=rank + rank // 2, target_r=rank, total_step=1000),
        "prompt-tuning": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens),
        "p-tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens),
        "prefix-tuning": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens),
        "llama-adapter": peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10,
                                                   adapter_layers=min(30, layers)),
    }


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_methods_config_json_counts_equal_peft(capsys, tmp_path, build):
    """Every method peft has: the table's trainable count is peft's get_peft_model count
    on the same tiny model (built from the config.json the command reads)."""
    import peft

    model_config = build().config
    model_config.to_json_file(tmp_path / "config.json")
    code, out, err = _run(capsys, ["methods", "--config", str(tmp_path), "--rank", "8", "--virtual-tokens", "5"])
    assert code == 0, err
    table = _table(out)
    assert set(table) == {m.name for m in method_table.METHODS}
    for name, config in _peft_configs(8, 5, model_config.num_hidden_layers).items():
        trainable, _ = peft.get_peft_model(build(), config).get_nb_trainable_parameters()
        assert table[name] == trainable, (name, table[name], trainable)
    assert table["bottleneck"] > 0  # not a peft method: only that it trains something


def test_methods_builtin_gpt2_on_meta_equals_peft(capsys):
    """``--model gpt2`` (full size, meta device): LoRA and (IA)^3 counts are peft's on
    the same meta model."""
    import peft
    from transformers import AutoModelForCausalLM

    code, out, err = _run(capsys, ["methods", "--model", "gpt2", "--methods", "lora,ia3"])
    assert code == 0, err
    table = _table(out)
    assert set(table) == {"lora", "ia3"}
    model_config = method_table.load_model_config("gpt2", None)
    for name, config in _peft_configs(16, 20, 12).items():
        if name not in table:
            continue
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
        trainable, total = peft.get_peft_model(model, config).get_nb_trainable_parameters()
        assert table[name] == trainable, (name, table[name], trainable)
        assert f"{100 * trainable / total:.4f}" in out


def test_methods_bad_input_says_why(capsys, tmp_path):
    code, _, err = _run(capsys, ["methods", "--config", str(tmp_path / "missing.json")])
    assert code == 2 and "no config.json" in err
    code, _, err = _run(capsys, ["methods", "--model", "gpt2", "--methods", "lora,nope"])
    assert code == 2 and "nope" in err


def _benchmark_json(tmp_path: Path, monkeypatch) -> Path:
    """A result file written by the benchmarks' own code (common.measure_variants and
    write_json), with stub timers: variant v 'takes' TIMES[v] ms at every M."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    times = {"base": 2.0, "unfused": 5.0, "fastpeft": 2.5}
    monkeypatch.setattr(common, "bench_ms", lambda fn, **kw: times[fn.__name__])
    monkeypatch.setattr(common, "bench_graph_ms", lambda fn, **kw: times[fn.__name__] / 2)
    rows = []
    for K, N in [(48, 40), (40, 56)]:
        for M in (1, 16, 256):
            x = torch.randn(M, K)
            fns = {}
            for name in times:
                fn = (lambda x=x: x.sum(1, keepdim=True))
                fn.__name__ = name
                fns[name] = fn
            row = {"pass": "fwd", "K": K, "N": N, "M": M, "r": 8}
            common.measure_variants(row, fns, lambda name, x=x: x.sum(1, keepdim=True), 1e-6, with_graph=True)
            rows.append(row)
    path = tmp_path / "bench.json"
    common.write_json(str(path), {"device_info": common.device_info(), "mode": "quick", "results": rows}, quiet=True)
    return path


def test_plot_writes_a_png_of_the_ratios(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastpeft import bench_plot

    path = _benchmark_json(tmp_path, monkeypatch)
    payload = json.loads(path.read_text())
    groups = bench_plot.panels(payload["results"])
    assert len(groups) == 2  # one panel per shape
    for lines in groups.values():
        assert set(lines) == {"unfused", "fastpeft"}
        assert lines["fastpeft"] == [(1, 1.25), (16, 1.25), (256, 1.25)]  # 2.5 ms / 2.0 ms
    for extra, name in (([], "bench.png"), (["--graph"], "bench_graph.png")):
        code, out, err = _run(capsys, ["plot", str(path), *extra])
        assert code == 0, err
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_refuses_a_file_without_ratios(capsys, tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"device_info": {}, "mode": "cpu-correctness",
                                "results": [{"K": 96, "N": 80, "M": 1, "rel_err": 1e-7, "tol": 1e-5}]}))
    code, _, err = _run(capsys, ["plot", str(path)])
    assert code == 2 and "correctness-only" in err
    assert not (tmp_path / "cpu.png").exists()


def test_bench_runs_the_program_with_its_options(capsys, tmp_path):
    (tmp_path / "bench_lora.py").write_text(
        "import json, sys\nopen(sys.argv[1 + sys.argv.index('--out')], 'w').write(json.dumps(sys.argv[1:]))\n"
        "sys.exit(3)\n"
    )
    out_file = tmp_path / "argv.json"
    code, _, err = _run(capsys, ["bench", "--dir", str(tmp_path), "lora", "--quick", "--out", str(out_file)])
    assert code == 3, err  # the program's own exit code
    assert json.loads(out_file.read_text()) == ["--quick", "--out", str(out_file)]


def test_bench_missing_program_or_folder_says_so(capsys, tmp_path):
    code, _, err = _run(capsys, ["bench", "--dir", str(tmp_path), "train"])
    assert code == 2 and "bench_train.py" in err and str(tmp_path) in err
    code, _, err = _run(capsys, ["bench", "--dir", str(tmp_path / "nowhere"), "lora"])
    assert code == 2 and "pip install -e ." in err
    code, _, err = _run(capsys, ["bench", "nosuch"])
    assert code == 2 and "unknown benchmark 'nosuch'" in err and "lora" in err
    assert cli.benchmarks_dir() == BENCH  # the checkout's folder by default


def test_selfcheck_quick_via_cli_runs_the_kernels(capsys, monkeypatch):
    from fastpeft.kernels import lora as lora_kernels

    calls = []
    real = lora_kernels.lora_linear_fwd
    monkeypatch.setattr(lora_kernels, "lora_linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = _run(capsys, ["selfcheck", "--quick", "--no-bench"])
    assert code == 0, out + err
    assert re.search(r"(\d+)/\1 checks passed", out), out
    assert out.count("[ok] lora kernel") == 2  # one case per interpreter dtype (fp32, fp16)
    assert len(calls) >= 2  # launched (the layer check launches it too)


def test_python_dash_m_fastpeft_runs_the_cli(capsys, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", ["fastpeft", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("fastpeft", run_name="__main__")
    assert exc.value.code == 0 and "methods" in capsys.readouterr().out
