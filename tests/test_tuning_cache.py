"""The tuner's picks on disk (kernels/tuning_cache.py) and ``fastpeft.pretune`` / ``fastpeft tune``.

The tuner is a no-op under the interpreter, so these tests run it as on a GPU with its
timer stubbed (``autotune.time_variant``) and a fake device name for index 0.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import triton

from tiny_models import tiny_llama

import fastpeft as fp
from fastpeft import tuning
from fastpeft.kernels import autotune, tuning_cache
from fastpeft.kernels.autotune import LIBRARY_GEMM, KernelConfig

CARD = "Fake H200 141GB"
CANDS = [KernelConfig(16, 64, 128), KernelConfig(32, 64, 64), LIBRARY_GEMM]
KEY = ("lora", 0, torch.bfloat16, "ieee", (torch.float32, torch.float32), 4096, 1024, 16, True, False, False, 256)


@pytest.fixture
def gpu_tuner(monkeypatch, tmp_path):
    """The tuner as on a GPU named ``CARD`` (index 0), an empty in-memory cache, a fresh
    cache directory, and a timer reporting ``times[candidate]`` without running anything."""
    times = {}
    timed = []

    def fake_time(run, cand):
        timed.append(cand)
        return times[cand]

    monkeypatch.setenv("FASTPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(autotune, "interpreter_active", lambda: False)
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    monkeypatch.setattr(autotune, "time_variant", fake_time)
    monkeypatch.setattr(tuning_cache, "_NAMES", {0: CARD})
    monkeypatch.setattr(tuning_cache, "_FILES", {})
    return times, timed, tmp_path / tuning_cache.FILE_NAME


def _fresh_process_state(monkeypatch):
    """What a new process starts with: no tuned picks in memory, the file not yet read."""
    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(tuning_cache, "_FILES", {})


def _no_timing(run, cand):
    raise AssertionError("timed although the pick is on disk")


def test_pick_persists_and_a_fresh_cache_reuses_it(gpu_tuner, monkeypatch):
    times, timed, path = gpu_tuner
    times.update({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    assert autotune.pick(KEY, None, lambda: CANDS) == CANDS[1] and timed == CANDS
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    _fresh_process_state(monkeypatch)
    monkeypatch.setattr(autotune, "time_variant", _no_timing)
    assert autotune.pick(KEY, None, lambda: CANDS) == CANDS[1]
    assert autotune.TUNED == {KEY: CANDS[1]}


def test_key_names_card_triton_dtype_and_bucket(gpu_tuner):
    times, _, path = gpu_tuner
    times.update({c: 1.0 for c in CANDS})
    autotune.pick(KEY, None, lambda: CANDS)
    (key, value), = json.loads(path.read_text())["entries"].items()
    parts = json.loads(key)
    assert parts[:3] == ["lora", CARD, f"triton {triton.__version__}"]
    assert "torch.bfloat16" in parts and parts[-1] == 256 and 0 not in parts[:2]
    assert value == {"type": "KernelConfig", **{f: getattr(CANDS[0], f) for f in value if f != "type"}}


def test_other_card_or_triton_version_tunes_again(gpu_tuner, monkeypatch):
    times, timed, _ = gpu_tuner
    times.update({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    autotune.pick(KEY, None, lambda: CANDS)
    _fresh_process_state(monkeypatch)
    monkeypatch.setattr(tuning_cache, "_NAMES", {0: "Fake A100"})
    timed.clear()
    autotune.pick(KEY, None, lambda: CANDS)
    assert timed == CANDS
    _fresh_process_state(monkeypatch)
    monkeypatch.setattr(tuning_cache, "_NAMES", {0: CARD})
    monkeypatch.setattr(tuning_cache.triton, "__version__", "9.9.9")
    timed.clear()
    autotune.pick(KEY, None, lambda: CANDS)
    assert timed == CANDS


def test_stored_pick_no_longer_a_candidate_is_retuned(gpu_tuner, monkeypatch):
    times, timed, _ = gpu_tuner
    times.update({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    autotune.pick(KEY, None, lambda: CANDS)
    _fresh_process_state(monkeypatch)
    timed.clear()
    assert autotune.pick(KEY, None, lambda: [CANDS[0], CANDS[2]]) == CANDS[0] and timed == [CANDS[0], CANDS[2]]


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', "[1, 2]"])
def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(gpu_tuner, content):
    times, timed, path = gpu_tuner
    times.update({CANDS[0]: 2.0, CANDS[1]: 1.0, CANDS[2]: 3.0})
    path.write_text(content)
    with pytest.warns(UserWarning, match="corrupt tuning cache"):
        assert autotune.pick(KEY, None, lambda: CANDS) == CANDS[1]
    assert timed == CANDS
    data = json.loads(path.read_text())
    assert data["format"] == 1 and len(data["entries"]) == 1


def test_unwritable_cache_warns_and_keeps_tuning_in_memory(gpu_tuner, monkeypatch, tmp_path):
    times, _, _ = gpu_tuner
    times.update({c: 1.0 for c in CANDS})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTPEFT_CACHE", str(blocker / "sub"))  # a directory under a file
    with pytest.warns(UserWarning, match="cannot write the tuning cache"):
        autotune.pick(KEY, None, lambda: CANDS)
    assert autotune.TUNED == {KEY: CANDS[0]}


def test_cpu_keys_and_disabled_cache_write_nothing(gpu_tuner, monkeypatch):
    times, _, path = gpu_tuner
    times.update({c: 1.0 for c in CANDS})
    cpu_key = ("lora", None) + KEY[2:]
    assert tuning_cache.disk_key(cpu_key) is None and tuning_cache.disk_key("k") is None
    autotune.pick(cpu_key, None, lambda: CANDS)
    monkeypatch.setenv("FASTPEFT_CACHE", "off")
    assert tuning_cache.cache_path() is None
    autotune.pick(KEY, None, lambda: CANDS)
    assert not path.exists()


# --------------------------------------------------------------------------- pretune


def _lora_model():
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model.eval()


def test_pretune_visits_every_layer_shape(gpu_tuner, monkeypatch):
    model = _lora_model()
    timed_keys = []

    def fastest(key, run, cands):
        timed_keys.append(key)
        return LIBRARY_GEMM  # cheap to run here; the choice itself is not under test

    monkeypatch.setattr(autotune, "_fastest", fastest)
    report = fp.pretune(model, batch_sizes=(1, 5, 40), progress=False)
    layers = [m for m in model.modules() if isinstance(m, fp.FastLoRALinear)]
    shapes = {(m.out_features, m.in_features) for m in layers}
    assert len(shapes) == 3  # q: 32x32, v: 16x32, down: 32x48
    expected = {(n, k, b) for n, k in shapes for b in (1, 8, 64)}
    seen = {(key[5], key[6], key[-1]) for key in timed_keys if key[0] == "lora"}
    assert seen == expected
    assert report.layers == len(layers) == 6 and report.shapes == 3 and report.runs == 9 and report.tuned == 9
    assert not model.training and all(not m.training for m in layers)


def test_pretune_tunes_mixed_batches_of_an_attached_pool(gpu_tuner, monkeypatch):
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    model.eval()
    pool = fp.AdapterPool(model, max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(0)
    pool.load("a", {n: (torch.randn(4, ls.in_features, generator=g), torch.randn(ls.out_features, 4, generator=g))
                    for n, ls in pool.layers.items()}, lora_alpha=8)
    timed_keys = []
    monkeypatch.setattr(autotune, "_fastest", lambda key, run, cands: timed_keys.append(key) or cands[0])
    report = fp.pretune(model, batch_sizes=(3, 20), progress=False)
    shapes = {(ls.out_features, ls.in_features) for ls in pool.layers.values()}
    # The mixed-adapter kernel's expand tiles (its launch choices are tuned on CUDA tensors only).
    mixed = {((key[6], key[7]), key[-1]) for key in timed_keys if key[0] == "multi_lora"}
    assert len(shapes) == 2 and mixed == {(s, b) for s in shapes for b in (4, 32)}
    assert report.runs == 2 * 2 * 2  # shapes x batch sizes x (own adapter, mixed)
    assert fp.pretune(model, batch_sizes=(3,), progress=False, mixed=False).runs == 2
    with pytest.raises(ValueError, match="AdapterPool"):
        fp.pretune(_lora_model(), batch_sizes=(1,), mixed=True)


def test_pretune_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_sizes"):
        tuning.pretune(_lora_model(), batch_sizes=(0,))
    with pytest.raises(ValueError, match="no fastpeft adapter layers"):
        tuning.pretune(torch.nn.Sequential(torch.nn.Linear(4, 4)), batch_sizes=(1,))


def test_tune_command_loads_model_and_adapter(tmp_path, capsys):
    model = _lora_model()
    fp.save_adapter(model, tmp_path / "adapter")
    tiny_llama().save_pretrained(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = tuning.main([str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--batch-sizes", "1,3",
                          "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "6 adapter layers, 3 distinct shapes, 6 forwards" in out
    with pytest.raises(SystemExit):
        tuning.main([str(tmp_path / "model"), "--batch-sizes", "1,x"])
