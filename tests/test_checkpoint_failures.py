"""Failed saves and loads leave no trace.

``save_adapter`` over an existing adapter directory replaces its files as one unit: an
I/O error injected at each step of a save (every rename, write, sync, serialisation)
leaves the directory byte for byte as it was, with no temporary file. ``load_adapter``
and ``inject`` that fail leave the model as it was: the same attributes (none added),
module objects, tensors, flags and each layer's active adapter.
"""
from __future__ import annotations

import errno
import json
import os
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import fastpeft as fp  # noqa: E402
import fastpeft.core.checkpoint as ck  # noqa: E402
import fastpeft.core.inject as fm  # noqa: E402
from fastpeft.core.checkpoint import AdapterCheckpointError  # noqa: E402

from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_llama  # noqa: E402


def _model(seed: int, r: int, **kwargs):
    torch.manual_seed(seed)
    return fp.inject(
        tiny_llama(), fp.LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    )


def _contents(path):
    """``{relative path: bytes}`` of everything under ``path`` (temporaries included)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = None if os.path.isdir(full) else open(full, "rb").read()
    return out


class _Fault:
    """Wraps a function so that its ``n``-th call (0-based) raises ``OSError(ENOSPC)``;
    counts calls either way."""

    def __init__(self, real, n=None):
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, *args, **kwargs):
        i = self.calls
        self.calls += 1
        if i == self.n:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return self.real(*args, **kwargs)


def _patch_points():
    """Every I/O step of a save: (name, object, attribute)."""
    import safetensors.torch

    return [
        ("os.replace", os, "replace"),
        ("os.open", os, "open"),
        ("os.fsync", os, "fsync"),
        ("os.makedirs", os, "makedirs"),
        ("safetensors.save", safetensors.torch, "save"),
        ("json.dumps", json, "dumps"),
        ("torch.save", torch, "save"),
    ]


def _count_calls(monkeypatch, tmp_path, model, **kwargs):
    """How often a successful save into a copy of the old directory calls each step."""
    counts = {}
    for name, obj, attr in _patch_points():
        fault = _Fault(getattr(obj, attr))
        monkeypatch.setattr(obj, attr, fault)
        counts[name] = fault
    fp.save_adapter(model, tmp_path, **kwargs)
    monkeypatch.undo()
    return {name: f.calls for name, f in counts.items()}


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("layout", ["existing", "fresh"])
def test_a_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch, safe_serialization, layout):
    old_model, new_model = _model(0, 2), _model(1, 4)
    target = tmp_path / "out" / "adapter"
    stale = "adapter_model.bin" if safe_serialization else "adapter_model.safetensors"
    probe = tmp_path.parent / f"probe-{tmp_path.name}" / "adapter"
    if layout == "existing":
        for directory in (target, probe):
            fp.save_adapter(old_model, directory, safe_serialization=safe_serialization)
            # A file of the other format (the new save removes it in the same step) and
            # the user's own file (left alone).
            (directory / stale).write_bytes(b"an older save in the other format")
            (directory / "README.md").write_text("the user's notes")
    before = _contents(tmp_path)
    counts = _count_calls(monkeypatch, probe, new_model, safe_serialization=safe_serialization)
    # Existing: config, weights and the stale file go aside, two come in; fresh: two come in.
    assert counts["os.replace"] == (5 if layout == "existing" else 2), counts
    tried = 0
    for name, obj, attr in _patch_points():
        for n in range(counts[name]):
            monkeypatch.setattr(obj, attr, _Fault(getattr(obj, attr), n))
            with pytest.raises(OSError, match="injected"):
                fp.save_adapter(new_model, target, safe_serialization=safe_serialization)
            monkeypatch.undo()
            assert _contents(tmp_path) == before, f"{name} failing at call {n} changed the directory"
            tried += 1
    assert tried >= 6
    # And with no fault the new adapter replaces the old one as a whole.
    fp.save_adapter(new_model, target, safe_serialization=safe_serialization)
    after = _contents(tmp_path)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    expected = {"adapter_config.json", weights} | ({"README.md"} if layout == "existing" else set())
    assert set(after) - set(before) - {"out", "out/adapter"} <= {f"out/adapter/{n}" for n in expected}
    assert sorted(os.listdir(target)) == sorted(expected)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4
    ids = input_ids()
    assert torch.equal(logits(fp.load_adapter(tiny_llama(), target), ids), logits(new_model, ids))


def test_new_files_get_the_usual_permissions(tmp_path):
    model = _model(0, 2)
    fp.save_adapter(model, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_leftover_after_a_complete_save_is_reported(tmp_path, monkeypatch):
    """Deleting the previous files is the only step after the save is complete: if it
    fails the save stands, and a warning says what was left where."""
    fp.save_adapter(_model(0, 2), tmp_path)
    monkeypatch.setattr(os, "unlink", _Fault(os.unlink, 0))
    with pytest.warns(UserWarning, match="could not delete the previous"):
        fp.save_adapter(_model(1, 4), tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4


# --------------------------------------------------------------------- loads and injects


def _peft_dir(tmp_path, **kwargs):
    path = tmp_path / "adapter"
    fp.save_adapter(_model(3, 4, **kwargs), path)
    return path


def _edit(path, config=None, tensors=None):
    from safetensors.torch import load_file, save_file

    if config is not None:
        data = json.loads((path / "adapter_config.json").read_text())
        config(data)
        (path / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        file = str(path / "adapter_model.safetensors")
        t = load_file(file)
        tensors(t)
        save_file(t, file)


def _first(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


FAILED_LOADS = {
    "bad-config": (dict(config=lambda d: d.update(lora_dropout=2.0)), ValueError),
    "unsupported-init": (dict(config=lambda d: d.update(init_lora_weights="pissa")), NotImplementedError),
    "missing-key": (dict(tensors=lambda t: t.pop(_first(t, "lora_A.weight"))), AdapterCheckpointError),
    "shape": (dict(tensors=lambda t: t.update({_first(t, "lora_A.weight"): torch.zeros(4, 7)})),
              AdapterCheckpointError),
    "rank": (dict(config=lambda d: d.update(r=8)), AdapterCheckpointError),
}


@pytest.fixture(params=["plain", "hand-built-layer", "with-adapter"])
def model(request):
    """A tiny Llama that has no fastpeft attributes (plain, or with a FastLoRALinear put
    in by hand whose active adapter must stay), or one that holds an adapter."""
    m = tiny_llama()
    if request.param == "hand-built-layer":
        attn = m.model.layers[0].self_attn
        attn.k_proj = fp.FastLoRALinear.from_linear(attn.k_proj, r=2, adapter_name="mine")
    elif request.param == "with-adapter":
        fp.inject(m, fp.LoraConfig(r=2, target_modules=["k_proj"]), "a")
    return m


@pytest.mark.parametrize("case", sorted(FAILED_LOADS))
def test_a_failed_load_leaves_no_trace(tmp_path, model, case):
    edits, exc = FAILED_LOADS[case]
    path = _peft_dir(tmp_path)
    _edit(path, **edits)
    before = snapshot(model)
    with pytest.raises(exc):
        fp.load_adapter(model, path, adapter_name="new")
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("step", ["upcast_adapter", "mark_trainable", "sync_active"])
def test_a_failure_late_in_inject_leaves_no_trace(model, monkeypatch, step):
    """Fails after the model's attributes were set: they must go again."""
    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    before = snapshot(model)
    monkeypatch.setattr(fm, step, boom)
    with pytest.raises(RuntimeError, match="injected"):
        fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "new")
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        (dict(target_modules=["nowhere"]), ValueError),
        (dict(target_modules=["q_proj"], init_lora_weights="pissa"), NotImplementedError),
        (dict(target_modules=["q_proj"], modules_to_save=["not_here"]), ValueError),
        (dict(target_modules=["q_proj"], use_dora=True, lora_bias=True), NotImplementedError),
    ],
)
def test_a_failed_inject_leaves_no_trace(model, kwargs, exc):
    before = snapshot(model)
    with pytest.raises(exc):
        fp.inject(model, fp.LoraConfig(r=2, **kwargs), "new")
    assert_same_snapshot(before, snapshot(model))


def test_a_failed_copy_leaves_no_trace(tmp_path, model, monkeypatch):
    path = _peft_dir(tmp_path)
    real = torch.Tensor.copy_

    def flaky(self, src, *a, **k):
        raise RuntimeError("injected copy failure")

    before = snapshot(model)
    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        ck.load_adapter(model, path, adapter_name="new")
    monkeypatch.setattr(torch.Tensor, "copy_", real)
    assert_same_snapshot(before, snapshot(model))


def test_a_plain_model_gets_its_attributes_only_on_success(tmp_path):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fp.adapter_names(model) == []  # reading adds nothing either
    assert "fastpeft_config" not in model.__dict__ and "fastpeft_active" not in model.__dict__
    fp.load_adapter(model, _peft_dir(tmp_path))
    assert model.fastpeft_active == "default" and list(model.fastpeft_config) == ["default"]
