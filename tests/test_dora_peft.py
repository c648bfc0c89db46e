"""DoRA (``use_dora=True``) against the real ``peft`` on tiny random models: checkpoints
both ways (logits), one training step's gradients, merge/unmerge/unload, mixed batches
row by row, torch.compile, and a bad magnitude vector refused with the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

import fastpeft as fp  # noqa: E402
from fastpeft.core.checkpoint import AdapterCheckpointError  # noqa: E402
from fastpeft.kernels import lora as lora_kernels  # noqa: E402
from fastpeft.kernels import multi_lora as multi_kernels  # noqa: E402
from fastpeft.methods.lora.layer import FastLoRALinear  # noqa: E402

from conftest import DEVICE  # noqa: E402
from numerics import rel_err  # noqa: E402
from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_gpt2, tiny_llama  # noqa: E402

TOL = 1e-5
BUILD = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}


def _model(kind):
    return BUILD[kind][0]().to(DEVICE)


def _peft_dora(tmp_path, kind="llama", dropout=0.0):
    """A PEFT DoRA adapter with random A, B and magnitudes away from their initial norms,
    saved; returns (directory, PEFT model)."""
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, use_dora=True,
                          target_modules=BUILD[kind][1])
    pm = peft.get_peft_model(_model(kind), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    path = tmp_path / f"peft-{kind}"
    pm.save_pretrained(str(path))
    return path, pm


def _spy_mag(monkeypatch, module, name):
    """Replace ``module.name`` (a kernel launcher) by a spy; returns, per launch, whether
    it carried DoRA scales (``mag=``): the fused epilogue ran."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mag") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def dora_launches(monkeypatch):
    return _spy_mag(monkeypatch, lora_kernels, "lora_linear_fwd")


@pytest.mark.parametrize("kind", ["llama"])  # gpt2 (Conv1D) loads in the merge test below
def test_peft_dora_checkpoint_loads_and_saves_back(tmp_path, kind, dora_launches):
    path, pm = _peft_dora(tmp_path, kind)
    keys = safetensors_torch.load_file(str(path / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    ids = input_ids().to(DEVICE)
    ref = logits(pm, ids)
    model = fp.load_adapter(_model(kind), path)
    out = logits(model, ids)
    assert rel_err(out, ref) <= TOL
    assert rel_err(out, logits(_model(kind), ids)) > 1e-3, "a no-op adapter would prove nothing"
    assert any(dora_launches), "the fused kernel's DoRA epilogue did not run"
    fp.save_adapter(model, tmp_path / "ours")
    saved = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(keys)
    back = peft.PeftModel.from_pretrained(_model(kind), str(tmp_path / "ours")).eval()
    assert rel_err(logits(back, ids), ref) <= TOL


def test_new_dora_adapter_starts_as_the_base():
    base = torch.nn.Linear(24, 20, device=DEVICE)
    layer = FastLoRALinear.from_linear(base, 4, 8, use_dora=True)
    m = layer.adapters["default"].lora_magnitude_vector
    assert torch.allclose(m, base.weight.norm(dim=1), rtol=1e-6)  # B = 0: m = ||W|| per row, as PEFT
    x = torch.randn(5, 24, device=DEVICE)
    with torch.no_grad():
        assert rel_err(layer(x), base(x)) <= TOL


def test_gradients_match_the_reference_without_dropout():
    from fastpeft.kernels.reference import dora_linear_ref

    layer = FastLoRALinear.from_linear(torch.nn.Linear(24, 20, device=DEVICE), 4, 8, init_lora_weights=False,
                                       use_dora=True).train()
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(20, device=DEVICE))
    x = torch.randn(2, 3, 24, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 3, 20, device=DEVICE)
    (layer(x) * g).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, a.lora_A, a.lora_B, a.lora_magnitude_vector)]
    ref = dora_linear_ref(leaves[0], layer.weight.double(), layer.bias.double(), leaves[1], leaves[2], a.scaling,
                          leaves[3])
    (ref * g.double()).sum().backward()
    for ours, theirs in zip((x, a.lora_A, a.lora_B, a.lora_magnitude_vector), leaves):
        assert rel_err(ours.grad, theirs.grad) <= TOL


def test_one_training_step_gradients_match_peft(tmp_path):
    path, pm = _peft_dora(tmp_path, dropout=0.3)
    model = fp.load_adapter(_model("llama"), path, is_trainable=True)
    pm.train()
    model.train()
    ids = input_ids().to(DEVICE)
    torch.manual_seed(3)  # the same dropout masks: both draw them layer by layer, in order
    pm(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(3)
    model(input_ids=ids, labels=ids).loss.backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(theirs) == len(ours) == 12  # A, B, m of 4 layers
    for name, grad in theirs.items():
        key = name.replace("base_model.model.", "").replace(".lora_magnitude_vector.default.weight",
                                                            ".adapters.default.lora_magnitude_vector")
        key = key.replace(".lora_A.default.weight", ".adapters.default.lora_A")
        key = key.replace(".lora_B.default.weight", ".adapters.default.lora_B")
        assert rel_err(ours[key], grad) <= 1e-5, name


def test_merge_unmerge_unload_safe_merge_match_peft(tmp_path):
    path, pm = _peft_dora(tmp_path, "gpt2")
    ids = input_ids().to(DEVICE)
    ref = logits(pm, ids)
    model = fp.load_adapter(_model("gpt2"), path)
    layer = model.transformer.h[0].attn.c_attn
    w0 = layer.weight.detach().clone()
    fp.merge(model, safe_merge=True)
    assert layer.merged
    assert rel_err(logits(model, ids), ref) <= 1e-4  # PEFT's own merge tolerance
    peft_merged = pm.merge_and_unload()
    assert rel_err(layer.weight, peft_merged.transformer.h[0].attn.c_attn.weight) <= 1e-5
    fp.unmerge(model)
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    assert rel_err(logits(model, ids), ref) <= TOL
    unloaded = fp.unload(model, safe_merge=True)
    assert not any(isinstance(m, FastLoRALinear) for m in unloaded.modules())
    assert rel_err(logits(unloaded, ids), ref) <= 1e-4


def _three_adapter_layer():
    """A layer with DoRA adapters "a" (r=4) and "c" (r=6) and a LoRA adapter "b" (r=2)."""
    layer = FastLoRALinear.from_linear(torch.nn.Linear(24, 20, device=DEVICE), 4, 8, adapter_name="a",
                                       init_lora_weights=False, use_dora=True)
    layer.add_adapter("b", 2, 4, init_lora_weights=False)
    layer.add_adapter("c", 6, 8, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        for name in ("a", "c"):
            layer.adapters[name].lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(20, device=DEVICE))
    return layer.eval()


def test_set_and_delete_adapter():
    from fastpeft.kernels.reference import dora_linear_ref

    layer = _three_adapter_layer()
    x = torch.randn(3, 24, device=DEVICE)
    for name in ("a", "c"):
        layer.set_adapter(name)
        a = layer.adapters[name]
        with torch.no_grad():
            ref = dora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), a.lora_A.double(),
                                  a.lora_B.double(), a.scaling, a.lora_magnitude_vector.double())
            assert rel_err(layer(x), ref) <= TOL
    layer.delete_adapter("a")
    assert "a" not in layer._dora_norm_cache and "a" not in layer._dora_scale_cache
    with torch.no_grad():
        assert rel_err(layer(x), ref) <= TOL  # "c" still active


def test_mixed_batch_rows_equal_each_adapter_alone(monkeypatch):
    layer = _three_adapter_layer()
    mags = _spy_mag(monkeypatch, multi_kernels, "multi_lora_linear_fwd")
    names = ["a", "b", None, "c", "a"]
    x = torch.randn(len(names), 3, 24, device=DEVICE)
    with torch.no_grad():
        layer.row_adapters = names
        out = layer(x)
        layer.row_adapters = None
        assert mags == [True], "the mixed kernel's DoRA epilogue did not run (once)"
        for i, name in enumerate(names):
            layer.set_adapter(name)
            assert rel_err(out[i], layer(x[i])) <= TOL, (i, name)
    # with autograd (per-row losses): the same rows, gradients reach every magnitude
    layer.row_adapters = names
    out_g = layer(x)
    out_g.sum().backward()
    assert rel_err(out_g, out) <= TOL
    assert all(layer.adapters[n].lora_magnitude_vector.grad is not None for n in ("a", "c"))


def test_wrong_magnitude_length_is_refused_model_unchanged(tmp_path):
    path, _ = _peft_dora(tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(str(file))
    key = next(k for k in tensors if k.endswith(".lora_magnitude_vector"))
    tensors[key] = tensors[key][:-3]
    safetensors_torch.save_file(tensors, str(file))
    model = _model("llama")
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="other")
    before = snapshot(model)
    with pytest.raises(AdapterCheckpointError, match="lora_magnitude_vector.*output features"):
        fp.load_adapter(model, path, adapter_name="bad")
    assert_same_snapshot(before, snapshot(model))


def test_magnitudes_without_use_dora_are_refused(tmp_path):
    path, _ = _peft_dora(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterCheckpointError, match="use_dora=False"):
        fp.load_adapter(_model("llama"), path)


def test_compile_inference_and_training_without_graph_breaks():
    torch._dynamo.reset()
    layer = FastLoRALinear.from_linear(torch.nn.Linear(24, 20, device=DEVICE), 4, 8, init_lora_weights=False,
                                       use_dora=True)
    with torch.no_grad():
        layer.adapters["default"].lora_magnitude_vector.mul_(1.5)
    x = torch.randn(3, 24, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    layer.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), layer(x)) <= TOL
    layer.train()
    compiled(x).square().sum().backward()
    m = layer.adapters["default"].lora_magnitude_vector
    got = (m.grad.clone(), layer.lora_A.grad.clone())
    m.grad = layer.lora_A.grad = layer.lora_B.grad = None
    layer(x).square().sum().backward()
    assert rel_err(got[0], m.grad) <= TOL and rel_err(got[1], layer.lora_A.grad) <= TOL


def test_pool_serves_dora_rows_as_each_adapter_alone(tmp_path, monkeypatch):
    from fastpeft.serving.pool import AdapterError, AdapterPool

    path, pm = _peft_dora(tmp_path)
    torch.manual_seed(9)
    pm_lora = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=2, init_lora_weights=False,
                                                                   target_modules=["q_proj"])).eval()
    pm_lora.save_pretrained(str(tmp_path / "lora"))
    model = fp.inject(_model("llama"), fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    pool = AdapterPool(model, max_adapters=3, max_rank=8)
    pool.load("dora", path)
    pool.load("lora", tmp_path / "lora")
    mags = _spy_mag(monkeypatch, multi_kernels, "multi_lora_linear_fwd")
    names = ["dora", None, "lora"]
    ids = input_ids(batch=3).to(DEVICE)
    with torch.no_grad(), fp.batch_adapters(model, names):
        out = model(input_ids=ids).logits
    assert mags and all(mags), "the pool's mixed batch did not apply DoRA scales in the kernel"
    with torch.no_grad():
        ref = torch.cat([pm(input_ids=ids[0:1]).logits, _model("llama")(input_ids=ids[1:2]).logits,
                         pm_lora(input_ids=ids[2:3]).logits])
    assert rel_err(out, ref) <= TOL
    # a magnitude vector of the wrong length: refused, the pool unchanged
    bad = {k: v for k, v in safetensors_torch.load_file(str(path / "adapter_model.safetensors")).items()}
    key = next(k for k in bad if k.endswith(".lora_magnitude_vector"))
    bad[key] = bad[key][:-1]
    before = [t.clone() for ls in pool.layers.values() for t in (ls.lora_A, ls.mag)]
    with pytest.raises(AdapterError, match="lora_magnitude_vector must have shape"):
        pool.load("bad", bad, lora_alpha=8)
    assert pool.adapters == ["dora", "lora"]
    after = [t for ls in pool.layers.values() for t in (ls.lora_A, ls.mag)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # a live PEFT state dict (``lora_magnitude_vector.default.weight``) stages the same scales
    live = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in live)
    slot = pool.load("live", live, config=pm.peft_config["default"])
    for ls in pool.layers.values():
        assert torch.equal(ls.mag[slot], ls.mag[pool.slot_of("dora")])


def test_compiled_mixed_batch_with_dora_slots():
    torch._dynamo.reset()
    layer = _three_adapter_layer()
    x = torch.randn(3, 2, 24, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        for names in (["a", None, "b"], ["c", "a", "a"]):  # another mix: the same graph, rows as data
            layer.row_adapters = names
            assert rel_err(compiled(x), layer(x)) <= TOL
    layer.row_adapters = None
