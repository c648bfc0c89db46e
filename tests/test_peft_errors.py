"""Bad input gets a clear exception and leaves the model exactly as it was."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft as fp  # noqa: E402
from fastpeft.core.checkpoint import AdapterCheckpointError  # noqa: E402
from fastpeft.core.targets import replace_modules  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from conftest import DEVICE  # noqa: E402
from tiny_models import BUILDERS, assert_same_snapshot, input_ids, logits, snapshot  # noqa: E402

LLAMA_CFG = dict(
    r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="all", lora_bias=True,
    init_lora_weights=False,
)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A valid PEFT adapter for the tiny Llama (made once for the module)."""
    path = tmp_path_factory.mktemp("adapters") / "good"
    torch.manual_seed(7)
    pm = peft.get_peft_model(BUILDERS["llama"](0), peft.LoraConfig(**LLAMA_CFG))
    pm.save_pretrained(str(path))
    return path


def _copy(good_dir, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(good_dir, dst)
    return dst


def _edit_tensors(path, fn):
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, fn):
    file = path / "adapter_config.json"
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))


@pytest.fixture(params=["plain", "with-adapter"])
def model(request, good_dir):
    """A fresh tiny Llama; the second flavour already holds a loaded adapter 'a'
    (so failures must also keep existing adapters intact)."""
    m = BUILDERS["llama"](0).to(DEVICE)
    if request.param == "with-adapter":
        fp.load_adapter(m, good_dir, adapter_name="a", is_trainable=True)
        m.train()
    return m


def _fails(model, path, exc, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fp.load_adapter(model, path, adapter_name="new", **kwargs)
    assert_same_snapshot(before, snapshot(model))


def test_good_adapter_loads(model, good_dir):
    fp.load_adapter(model, good_dir, adapter_name="new")
    assert "new" in fp.adapter_names(model)


def test_missing_directory_and_files(model, good_dir, tmp_path):
    _fails(model, tmp_path / "nope", FileNotFoundError, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(model, tmp_path / "empty", FileNotFoundError, "adapter_config.json")
    bad = _copy(good_dir, tmp_path)
    (bad / "adapter_model.safetensors").unlink()
    _fails(model, bad, FileNotFoundError, "neither adapter_model.safetensors nor adapter_model.bin")
    _fails(model, good_dir / "adapter_config.json", NotADirectoryError, "is a file")


@pytest.mark.parametrize(
    "edit, exc, match",
    [
        (lambda d: d.update(peft_type="NOT_A_METHOD"), ValueError, "unsupported peft_type 'NOT_A_METHOD'"),
        (lambda d: d.pop("peft_type"), ValueError, "no peft_type"),
        (lambda d: d.update(use_dora=True), NotImplementedError, "DoRA .* with lora_bias"),
        (lambda d: d.update(target_modules=["nothing_like_this"]), ValueError, "matched no module"),
        (lambda d: d.update(target_modules=["mlp"]), ValueError, "adapts only Linear"),
        (lambda d: d.update(modules_to_save=["not_here"]), ValueError, "modules_to_save"),
        (lambda d: d.update(r=8), AdapterCheckpointError,
         "lora_A/lora_B have rank 4 but adapter_config.json says r=8: the config and the weights do not belong"),
        (lambda d: d.update(bias="none"), AdapterCheckpointError, "unexpected keys"),
        (lambda d: d.update(lora_bias=False), AdapterCheckpointError, "unexpected keys: .*lora_B.bias"),
        (lambda d: d.update(bias="sometimes"), ValueError, "bias must be"),
        (lambda d: d.update(target_parameters=["x.weight"]), NotImplementedError, "target_parameters"),
    ],
)
def test_bad_config(model, good_dir, tmp_path, edit, exc, match):
    bad = _copy(good_dir, tmp_path)
    _edit_config(bad, edit)
    _fails(model, bad, exc, match)


def test_invalid_json(model, good_dir, tmp_path):
    bad = _copy(good_dir, tmp_path)
    (bad / "adapter_config.json").write_text("{not json")
    _fails(model, bad, AdapterCheckpointError, "not valid JSON")


def test_unknown_config_fields_are_not_fatal(model, good_dir, tmp_path):
    ok = _copy(good_dir, tmp_path, "ok")
    _edit_config(ok, lambda d: d.update(field_from_peft_v9={"x": 1}))
    fp.load_adapter(model, ok, adapter_name="new")
    assert model.fastpeft_config["new"].extra["field_from_peft_v9"] == {"x": 1}


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop(next(k for k in sorted(t) if "lora_A" in k)), "missing keys: .*lora_A.weight"),
        (lambda t: t.pop("base_model.model.lm_head.weight"), "missing keys: lm_head.weight"),
        (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}),
         "unexpected keys: model.layers.0.mlp.up_proj"),
        (lambda t: t.update({k: torch.zeros(5, 32) for k in t
                             if k.endswith("layers.1.self_attn.q_proj.lora_A.weight")}),
         r"shape \(5, 32\)"),
        (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if k.endswith("q_proj.lora_B.weight")}),
         "int32"),
        (lambda t: t.update({k.replace("base_model.model.", "", 1): t.pop(k) for k in list(t)[:1]}),
         "do not start with 'base_model.model.'"),
    ],
)
def test_bad_tensors(model, good_dir, tmp_path, edit, match):
    bad = _copy(good_dir, tmp_path)
    _edit_tensors(bad, edit)
    _fails(model, bad, AdapterCheckpointError, match)


def _q_proj_B(t):
    return next(k for k in sorted(t) if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))


@pytest.mark.parametrize(
    "config_edit, tensors_edit, match",
    [
        # lora_A rank 4 beside a lora_B of rank 3: the two tensors, not the base model.
        (None, lambda t: t.update({_q_proj_B(t): torch.zeros(32, 3)}),
         r"q_proj.lora_A.weight has shape \(4, 32\) \(rank 4\) but .*q_proj.lora_B.weight has shape \(32, 3\) "
         r"\(rank 3\): the two tensors do not belong together"),
        # The config's r against rank-4 tensors, directly or through rank_pattern.
        (lambda d: d.update(r=8), None, "rank 4 but adapter_config.json says r=8: the config and the weights"),
        (lambda d: d.update(rank_pattern={"q_proj": 2}), None,
         r"q_proj: lora_A/lora_B have rank 4 but adapter_config.json says rank_pattern\['q_proj'\] = 2 for this"),
        (lambda d: d.update(r=8, rank_pattern={"v_proj": 4}), None,
         r"q_proj: .*says r=8 \(no rank_pattern entry matches this module\)"),
    ],
)
def test_rank_mismatch_names_its_cause(model, good_dir, tmp_path, config_edit, tensors_edit, match):
    bad = _copy(good_dir, tmp_path)
    if config_edit is not None:
        _edit_config(bad, config_edit)
    if tensors_edit is not None:
        _edit_tensors(bad, tensors_edit)
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match=match) as info:
        fp.load_adapter(model, bad, adapter_name="new")
    assert "other layer sizes" not in str(info.value)
    assert_same_snapshot(before, snapshot(model))


def test_alpha_pattern_is_applied_and_a_rank_pattern_that_fits_loads(good_dir, tmp_path):
    """rank_pattern/alpha_pattern as PEFT saves them load with PEFT's numbers (the rank
    check reads the pattern, not only r)."""
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16},
               init_lora_weights=False)
    torch.manual_seed(3)
    pm = peft.get_peft_model(BUILDERS["llama"](0), peft.LoraConfig(**cfg)).eval()
    pm.save_pretrained(str(tmp_path / "pat"))
    ids = input_ids()
    model = fp.load_adapter(BUILDERS["llama"](0), tmp_path / "pat")
    assert torch.allclose(logits(model, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)
    _edit_config(tmp_path / "pat", lambda d: d.update(rank_pattern={}))
    with pytest.raises(AdapterCheckpointError, match=r"v_proj: lora_A/lora_B have rank 2 but .* says r=4"):
        fp.load_adapter(BUILDERS["llama"](0), tmp_path / "pat")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupted_safetensors(model, good_dir, tmp_path, damage):
    bad = _copy(good_dir, tmp_path)
    file = bad / "adapter_model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = b"\x00" * 16 + data[16:]
    else:
        data = data[:8] + b"[" + data[9:]
    file.write_bytes(data)
    _fails(model, bad, AdapterCheckpointError, "corrupted or truncated")


def test_corrupted_bin(model, good_dir, tmp_path):
    bad = _copy(good_dir, tmp_path)
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"not a torch file")
    _fails(model, bad, AdapterCheckpointError, "adapter_model.bin")


def test_adapter_for_another_base(good_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True)
    )
    before = snapshot(other)
    with pytest.raises(AdapterCheckpointError, match="another base|shape"):
        fp.load_adapter(other, good_dir)
    assert_same_snapshot(before, snapshot(other))
    gpt2 = BUILDERS["gpt2"](0)
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match="matched no module"):
        fp.load_adapter(gpt2, good_dir)
    assert_same_snapshot(before, snapshot(gpt2))


def test_duplicate_adapter_name(model, good_dir):
    fp.load_adapter(model, good_dir, adapter_name="new")
    _fails(model, good_dir, ValueError, "already has an adapter named 'new'")


def test_dora_with_lora_bias_is_refused(tmp_path):
    model = BUILDERS["llama"](0)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="DoRA"):
        fp.inject(model, fp.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, lora_bias=True))
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(target_modules=["nope"]), ValueError, "matched no module .*q_proj"),
        (dict(target_modules=r".*mlp"), ValueError, "LlamaMLP"),
        (dict(target_modules=["q_proj"], init_lora_weights="pissa"), NotImplementedError, "pissa"),
        (dict(target_modules=["q_proj"], layers_to_transform=[7]), ValueError, "layers_to_transform"),
    ],
)
def test_bad_inject(model, kwargs, exc, match):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fp.inject(model, fp.LoraConfig(r=4, **kwargs), adapter_name="new")
    assert_same_snapshot(before, snapshot(model))


def test_bad_config_values():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fp.LoraConfig(r=0)
    with pytest.raises(ValueError, match="regex string"):
        fp.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fp.LoraConfig(target_modules="(unclosed")
    with pytest.raises(ValueError, match="adapter_name"):
        fp.inject(BUILDERS["llama"](0), fp.LoraConfig(target_modules=["q_proj"]), adapter_name="__base__")


def test_replace_modules_is_atomic():
    model = BUILDERS["llama"](0)
    before = snapshot(model)
    new = torch.nn.Linear(32, 32)
    with pytest.raises(KeyError, match="no module"):
        replace_modules(model, {"model.layers.0.self_attn.q_proj": new, "model.layers.0.self_attn.nope": new})
    with pytest.raises(TypeError, match="nn.Module"):
        replace_modules(model, {"model.layers.0.self_attn.q_proj": new, "model.layers.0.self_attn.k_proj": 3})
    with pytest.raises(ValueError, match="inside the other"):
        replace_modules(model, {"model.layers.0": new, "model.layers.0.self_attn": new})
    assert_same_snapshot(before, snapshot(model))
    old = replace_modules(model, {"model.layers.0.self_attn.q_proj": new})
    assert model.model.layers[0].self_attn.q_proj is new
    replace_modules(model, old)
    assert_same_snapshot(before, snapshot(model))


def test_failure_after_partial_copy_restores_base(model, good_dir, monkeypatch):
    """Even an error in the middle of copying tensors (e.g. out of memory) restores
    base tensors that were overwritten (bias='all' writes base biases)."""
    import fastpeft.core.checkpoint as ck

    calls = {"n": 0}
    real = torch.Tensor.copy_

    def flaky_copy(self, src, *a, **k):
        calls["n"] += 1
        if tuple(self.shape) == (100, 32):  # lm_head's copy: the last tensor, after the base biases
            raise RuntimeError("simulated failure while copying")
        return real(self, src, *a, **k)

    before = snapshot(model)
    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        ck.load_adapter(model, good_dir, adapter_name="new")
    monkeypatch.setattr(torch.Tensor, "copy_", real)
    assert calls["n"] > 20, "the failure came before the base biases were overwritten"
    assert_same_snapshot(before, snapshot(model))


def test_save_errors(tmp_path):
    model = BUILDERS["llama"](0)
    with pytest.raises(KeyError, match="no adapter named"):
        fp.save_adapter(model, tmp_path / "x")
    fp.inject(model, fp.LoraConfig(target_modules=["q_proj"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        fp.save_adapter(model, tmp_path / "file")
    ids = input_ids()
    fp.save_adapter(model, tmp_path / "ok")
    assert logits(fp.load_adapter(BUILDERS["llama"](0), tmp_path / "ok"), ids).shape == (3, 7, 100)
