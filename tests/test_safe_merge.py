"""``safe_merge=True`` as PEFT's: the merged weights are computed on a copy and checked
before anything changes; NaN or inf raises ``ValueError`` naming the layer and leaves
the whole model unmerged (every layer, not the ones before the bad one). Layers take
PEFT's ``merge(safe_merge=..., adapter_names=...)`` arguments too."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastpeft as fp  # noqa: E402

from numerics import rel_err  # noqa: E402
from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_llama  # noqa: E402

BAD = "model.layers.1.self_attn.v_proj"  # a late layer: earlier ones would merge first


def _lora_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    return fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                     backend="torch")


def _poison(model, value):
    with torch.no_grad():
        model.get_submodule(BAD).adapters["default"].lora_B[0, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["merge", "unload"])
def test_safe_merge_refuses_a_broken_adapter_and_changes_nothing(tmp_path, value, how):
    model = _lora_model()
    _poison(model, value)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '{BAD}': merging adapter\(s\) \['default'\] would put NaN or inf"):
        if how == "merge":
            fp.merge(model, safe_merge=True)
        else:
            fp.unload(model, safe_merge=True)
    assert_same_snapshot(before, snapshot(model))
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # PEFT refuses the same adapter.
    fp.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge_and_unload(safe_merge=True)


def test_safe_merge_refuses_an_fp16_overflow_as_peft_does(tmp_path):
    """A finite adapter whose merged weight passes fp16's range: inf after the cast."""
    model = _lora_model(torch.float16)
    layer = model.get_submodule(BAD)
    with torch.no_grad():
        layer.weight[0, 0] = 65000.0
        layer.adapters["default"].lora_A.zero_()
        layer.adapters["default"].lora_B.zero_()
        layer.adapters["default"].lora_A[0, 0] = 100.0
        layer.adapters["default"].lora_B[0, 0] = 100.0  # s * B A = 10^4 at [0, 0]
    fp.save_adapter(model, tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '{BAD}'.*beyond the range of torch.float16"):
        fp.merge(model, safe_merge=True)
    assert_same_snapshot(before, snapshot(model))
    base = tiny_llama().half()
    with torch.no_grad():
        base.get_submodule(BAD).weight[0, 0] = 65000.0
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge_and_unload(safe_merge=True)
    # Without safe_merge both merge the inf, as PEFT does.
    fp.merge(model)
    assert torch.isinf(layer.weight[0, 0])


def test_safe_unload_of_a_good_adapter_matches_peft(tmp_path):
    model = _lora_model()
    fp.save_adapter(model, tmp_path)
    ids = input_ids()
    want = logits(model, ids)
    plain = fp.unload(model, safe_merge=True)
    assert not any(isinstance(m, fp.FastLoRALinear) for m in plain.modules())
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).merge_and_unload(safe_merge=True)
    assert rel_err(logits(plain, ids), logits(theirs, ids)) <= 1e-5
    assert rel_err(logits(plain, ids), want) <= 1e-5


def test_layer_merge_takes_peft_arguments_and_is_all_or_nothing():
    torch.manual_seed(0)
    layer = fp.FastLoRALinear(12, 10, r=2, init_lora_weights=False, adapter_name="a")
    layer.add_adapter("b", 3, 6, init_lora_weights=False)
    x = torch.randn(4, 12)
    one_by_one = copy.deepcopy(layer)
    one_by_one.merge("a")
    one_by_one.merge("b")
    layer.merge(adapter_names=["a", "b"], safe_merge=True)
    assert layer.merged_adapters == ["a", "b"]
    assert torch.equal(layer.weight, one_by_one.weight) and torch.equal(layer.bias, one_by_one.bias)
    layer.unmerge()
    with torch.no_grad():
        layer.adapters["b"].lora_A[0, 0] = float("nan")
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merging adapter\(s\) \['a', 'b'\] would put NaN or inf"):
        layer.merge(adapter_names=["a", "b"], safe_merge=True)
    assert torch.equal(layer.weight, before) and layer.merged_adapters == []  # not even "a"
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.check_merge(adapter_names=["b"])
    layer.check_merge("b", check_finite=False)  # mergeable, only not finite
    with pytest.raises(TypeError, match="not both"):
        layer.merge("a", adapter_names=["b"])
    with pytest.raises(TypeError, match="list of names"):
        layer.merge(adapter_names="a")
    y = layer(x)
    layer.merge("a", safe_merge=True)
    assert layer.merged_adapters == ["a"]
    assert rel_err(layer(x), y) <= 1e-6


def test_peft_layer_safe_merge_raises_too():
    """The same NaN adapter through PEFT's own layer: it raises ValueError as well."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                             peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    theirs = pm.base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge(safe_merge=True)
    ours = fp.FastLoRALinear.from_linear(torch.nn.Linear(12, 10), r=2, lora_alpha=2, adapter_name="a")
    with torch.no_grad():
        ours.adapters["a"].lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ours.merge(safe_merge=True)


def test_ia3_safe_merge_checks_after_the_cast_to_the_weight_dtype():
    """An (IA)^3 vector that takes an fp16 weight past its range: caught on the fp16
    result (PEFT checks the fp32 product, before its cast, and lets this inf through).
    At model level the whole model stays unmerged."""
    torch.manual_seed(0)
    model = fp.inject(tiny_llama().half(), fp.IA3Config(target_modules=["k_proj", "v_proj"]), backend="torch")
    layer = model.get_submodule(BAD)
    with torch.no_grad():
        layer.adapters["default"].ia3_l.fill_(2.0)
        layer.adapters["default"].ia3_l[0] = 1e9  # row 0 of the weight (~0.02) times 1e9: past 65504
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '{BAD}'.*NaN or inf"):
        fp.merge(model, safe_merge=True)
    assert_same_snapshot(before, snapshot(model))
    layer.merge()  # unsafe: merged as asked
    assert torch.isinf(layer.base_weight()[0]).any()
    # PEFT's safe_merge misses it (fp32 product checked, then cast to fp16).
    pm = peft.get_peft_model(tiny_llama().half(), peft.IA3Config(target_modules=["k_proj", "v_proj"],
                                                                 feedforward_modules=[]))
    with torch.no_grad():
        pm.get_submodule(f"base_model.model.{BAD}").ia3_l["default"].copy_(layer.adapters["default"].ia3_l)
    merged = pm.merge_and_unload(safe_merge=True)
    assert torch.isinf(merged.get_submodule(BAD).weight).any()


def test_bottleneck_layers_still_refuse_to_merge():
    model = fp.inject(tiny_llama(), fp.BottleneckConfig(target_modules=["o_proj"], bottleneck_size=4))
    before = snapshot(model)
    for kwargs in ({}, {"safe_merge": True}):
        with pytest.raises(ValueError, match="cannot be merged"):
            fp.merge(model, **kwargs)
    assert_same_snapshot(before, snapshot(model))
