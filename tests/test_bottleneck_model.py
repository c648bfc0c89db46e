"""Bottleneck adapters at model level: placement, identity at init, save/load, errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DEVICE
from numerics import rel_err
import tiny_models
from tiny_models import VOCAB

import fastpeft as fp
import fastpeft.methods.bottleneck.op as ops
from fastpeft.methods.bottleneck.layer import BottleneckLinear
from fastpeft.kernels import bottleneck as bn_kernels


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = bn_kernels.bottleneck_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._bn_kernels, "bottleneck_linear_fwd", spy)
    return calls


def tiny_llama():
    return tiny_models.tiny_llama().to(DEVICE)


def tiny_gpt2():
    return tiny_models.tiny_gpt2().to(DEVICE)


def tiny_bert():
    return tiny_models.tiny_bert().to(DEVICE)


def _ids(batch=2, seq=7):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _out(model, ids=None):
    with torch.no_grad():
        out = model(ids if ids is not None else _ids())
    return out.logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckLinear))


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
def test_identity_at_init_and_placement(adapter_type, kernel_calls):
    ref = _out(tiny_llama())
    model = fp.inject(tiny_llama(), fp.BottleneckConfig(adapter_type=adapter_type, bottleneck_size=8,
                                                        non_linearity="gelu"))
    assert rel_err(_out(model), ref) <= 1e-6
    assert kernel_calls
    want = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    if adapter_type == "houlsby":
        want += [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert _adapted(model) == sorted(want)


def test_bert_pfeiffer_skips_attention_output():
    model = fp.inject(tiny_bert(), fp.BottleneckConfig(adapter_type="pfeiffer", reduction_factor=4))
    assert _adapted(model) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    model = fp.inject(tiny_bert(), fp.BottleneckConfig(adapter_type="houlsby", reduction_factor=4))
    assert len(_adapted(model)) == 4
    assert model.bert.encoder.layer[0].output.dense.adapters["default"].bottleneck_size == 8  # 32 // 4


def test_gpt2_conv1d_identity_at_init():
    ref = _out(tiny_gpt2())
    model = fp.inject(tiny_gpt2(), fp.BottleneckConfig(bottleneck_size=4))
    assert _adapted(model) == sorted([f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_proj")])
    assert rel_err(_out(model), ref) <= 1e-6


@pytest.mark.parametrize("ln_after", [False, True])
def test_save_load_round_trip(tmp_path, ln_after, kernel_calls):
    cfg = fp.BottleneckConfig(bottleneck_size=6, non_linearity="tanh", scaling=0.5, init_weights=False,
                              ln_after=ln_after)
    model = fp.inject(tiny_llama(), cfg)
    out = _out(model)
    assert rel_err(out, _out(tiny_llama())) > 1e-4  # a non-trivial adapter
    fp.save_adapter(model, tmp_path / "bn")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "bn" / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0.self_attn.o_proj"
    expect = {f"{p}.adapter_down.0.weight", f"{p}.adapter_down.0.bias", f"{p}.adapter_up.weight", f"{p}.adapter_up.bias"}
    if ln_after:
        expect |= {f"{p}.adapter_norm_after.weight", f"{p}.adapter_norm_after.bias"}
    assert expect == {k for k in keys if k.startswith(p + ".")}
    assert len(keys) == 4 * len(expect)
    saved_cfg = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert saved_cfg["peft_type"] == "BOTTLENECK" and saved_cfg["non_linearity"] == "tanh"
    loaded = fp.load_adapter(tiny_llama(), tmp_path / "bn", "mine")
    assert rel_err(_out(loaded), out) <= 1e-6
    assert fp.adapter_names(loaded) == ["mine"]


def test_training_step_updates_adapters_only(kernel_calls):
    model = fp.inject(tiny_llama(), fp.BottleneckConfig(bottleneck_size=4, init_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.adapter_" in n for n in trainable)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = _state(model)
    loss0 = model(_ids(), labels=_ids()).loss
    loss0.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.default.adapter_" in k for k in changed)


def test_two_adapters_and_mixed_batch():
    model = fp.inject(tiny_llama(), fp.BottleneckConfig(bottleneck_size=4, init_weights=False))
    fp.inject(model, fp.BottleneckConfig(adapter_type="pfeiffer", bottleneck_size=3, init_weights=False,
                                         non_linearity="silu"), adapter_name="p")
    model.eval()
    ids = _ids(3)
    with fp.batch_adapters(model, ["p", None, "default"]):
        mixed = _out(model, ids)
    for row, name in enumerate(["p", None, "default"]):
        fp.set_adapter(model, name)
        assert rel_err(mixed[row], _out(model, ids)[row]) <= 1e-6
    with pytest.raises(ValueError, match="cannot be merged"):
        fp.merge(model, "default")
    plain = fp.unload(model, merge_adapter=False)
    assert not _adapted(plain)
    assert rel_err(_out(plain), _out(tiny_llama())) <= 1e-6


def test_bad_inputs_change_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown non-linearity 'mish'"):
        fp.BottleneckConfig(non_linearity="mish")
    with pytest.raises(ValueError, match="adapter_type"):
        fp.BottleneckConfig(adapter_type="lora")
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        fp.BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="adapts nothing"):
        fp.BottleneckConfig(mh_adapter=False, output_adapter=False)
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="matched no module"):
        fp.inject(model, fp.BottleneckConfig(target_modules=["nope"]))
    assert _same_state(model, before) and not _adapted(model)
    # A checkpoint whose shapes do not fit (another bottleneck size) changes nothing.
    fp.save_adapter(fp.inject(tiny_llama(), fp.BottleneckConfig(bottleneck_size=4)), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["bottleneck_size"] = 5
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_down.0.weight has shape \(4, 32\), a bottleneck width of 4, "
                                         r"but adapter_config.json gives 5 \(bottleneck_size=5\)"):
        fp.load_adapter(model, tmp_path / "a")
    assert _same_state(model, before) and not _adapted(model)
    cfg["non_linearity"] = "mish"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown non-linearity"):
        fp.load_adapter(model, tmp_path / "a")
    assert _same_state(model, before)


@pytest.mark.parametrize("ln_after", [False, True])
def test_half_model_keeps_fp32_adapter_and_matches_fp32(tmp_path, ln_after):
    """fp16 model, adapter kept in fp32 (autocast_adapter_dtype, the default): runs
    fused (and with a layer norm, unfused), and a saved adapter loads the same way."""
    config = fp.BottleneckConfig(bottleneck_size=4, init_weights=False, ln_after=ln_after)
    ref_model = fp.inject(tiny_llama(), config)
    expected = _out(ref_model)
    fp.save_adapter(ref_model, str(tmp_path))
    for how in ("inject", "load"):
        model = tiny_llama().half()
        if how == "inject":
            fp.inject(model, config)
            model.load_state_dict(ref_model.state_dict())  # same adapter weights as the fp32 model
        else:
            fp.load_adapter(model, str(tmp_path))
        adapter = model.model.layers[0].mlp.down_proj.adapters["default"]
        assert adapter.down.weight.dtype == torch.float32
        out = _out(model)
        assert out.dtype == torch.float16
        assert rel_err(out.float(), expected) < 2e-2, how


def test_model_loaded_under_inference_mode_runs(tmp_path, kernel_calls):
    """Tensors made under torch.inference_mode have no version counter: the folded
    down-projection cache must still work (and see a replaced weight)."""
    src = fp.inject(tiny_llama(), fp.BottleneckConfig(bottleneck_size=4, init_weights=False))
    fp.save_adapter(src, str(tmp_path))
    with torch.inference_mode():
        model = fp.load_adapter(tiny_llama(), str(tmp_path)).eval()
        expected = _out(src)
        assert rel_err(model(_ids()).logits, expected) < 1e-5
        assert rel_err(model(_ids()).logits, expected) < 1e-5  # from the cache
    layer = model.model.layers[0].mlp.down_proj
    with torch.inference_mode():
        layer.adapters["default"].down.weight.data = torch.zeros_like(layer.adapters["default"].down.weight)
        src.model.layers[0].mlp.down_proj.adapters["default"].down.weight.zero_()
        assert rel_err(model(_ids()).logits, _out(src)) < 1e-5
    if fp.resolve_backend("auto", torch.device(DEVICE)) == "triton":
        assert kernel_calls


def test_folded_weight_cache_sees_replaced_tensors():
    """``.data`` swaps and load_state_dict(assign=True) keep the version counter; the
    cache must still notice (the stamp holds the old storage, so its address is not reused)."""
    torch.manual_seed(3)
    layer = BottleneckLinear.from_linear(
        torch.nn.Linear(24, 20).to(DEVICE), bottleneck_size=4, non_linearity="gelu", init_weights=False,
        backend="triton",
    )
    x = torch.randn(5, 24, device=DEVICE)
    adapter = layer.adapters["default"]
    for step in range(6):
        layer(x)  # fills the cache
        adapter.down.weight.data = torch.randn_like(adapter.down.weight)
        if step % 2:
            layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()}, assign=True)
            adapter = layer.adapters["default"]
        ref = ops.bottleneck_linear(x, layer.weight, layer.bias, adapter.down.weight, adapter.down.bias,
                                    adapter.up.weight, adapter.up.bias, adapter.scaling, "gelu", backend="torch")
        assert rel_err(layer(x), ref) < 1e-5, step


def test_folded_weight_cache_is_not_copied_or_kept_across_casts():
    """deepcopy/pickling drop the cache (no second copy of the base weight travels) and
    so do .to()/.half() (no old copy of the base weight stays alive)."""
    import copy

    layer = BottleneckLinear.from_linear(torch.nn.Linear(24, 20).to(DEVICE), bottleneck_size=4,
                                         init_weights=False, backend="triton")
    x = torch.randn(3, 24, device=DEVICE)
    y = layer(x)
    assert layer._eff_cache
    clone = copy.deepcopy(layer)
    assert clone._eff_cache == {} and layer._eff_cache
    assert rel_err(clone(x), y) < 1e-6
    layer.double().float()
    assert layer._eff_cache == {}
    assert rel_err(layer(x), y) < 1e-6
