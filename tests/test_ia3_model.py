"""(IA)^3 at model level: injection, PEFT interop (both directions), merge, errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DEVICE
from numerics import rel_err
import tiny_models
from tiny_models import VOCAB

import fastpeft as fp
import fastpeft.methods.ia3.op as ops
from fastpeft.methods.ia3.layer import IA3Linear
from fastpeft.kernels import ia3 as ia3_kernels

TARGETS = ["k_proj", "v_proj", "down_proj"]
FF = ["down_proj"]


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = ia3_kernels.ia3_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._ia3_kernels, "ia3_linear_fwd", spy)
    return calls


def tiny_llama():
    return tiny_models.tiny_llama().to(DEVICE)


def tiny_gpt2():
    return tiny_models.tiny_gpt2().to(DEVICE)


def _ids(batch=2, seq=7):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else _ids()).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _peft_adapter(tmp_path, seed=0):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    model = get_peft_model(
        tiny_llama(), PeftIA3Config(target_modules=TARGETS, feedforward_modules=FF, init_ia3_weights=False)
    )
    with torch.no_grad():  # l ~ 1 +- 0.5: a realistic, non-trivial adapter
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    path = tmp_path / "peft_ia3"
    model.save_pretrained(path)
    return path, _logits(model.eval())


def test_peft_adapter_loads_with_same_logits(tmp_path, kernel_calls):
    path, ref = _peft_adapter(tmp_path)
    model = fp.load_adapter(tiny_llama(), path)
    assert rel_err(_logits(model), ref) <= 1e-5
    assert kernel_calls, "the (IA)^3 Triton kernel did not run"
    k = model.model.layers[0].self_attn.k_proj
    d = model.model.layers[0].mlp.down_proj
    assert isinstance(k, IA3Linear) and not k.is_feedforward and k.ia3_vector.shape == (16, 1)
    assert isinstance(d, IA3Linear) and d.is_feedforward and d.ia3_vector.shape == (1, 48)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, IA3Linear)


def test_fastpeft_adapter_loads_in_peft(tmp_path, kernel_calls):
    from peft import PeftModel

    model = fp.inject(tiny_llama(), fp.IA3Config(target_modules=TARGETS, feedforward_modules=FF,
                                                 init_ia3_weights=False))
    ours = _logits(model)
    assert kernel_calls
    fp.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert rel_err(_logits(peft_model), ours) <= 1e-5


def test_config_json_has_peft_keys(tmp_path):
    path, _ = _peft_adapter(tmp_path)
    peft_json = json.loads((path / "adapter_config.json").read_text())
    model = fp.load_adapter(tiny_llama(), path)
    fp.save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours) == set(peft_json)
    for key in ("peft_type", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out", "inference_mode"):
        assert ours[key] == peft_json[key], key
    assert sorted(ours["target_modules"]) == sorted(peft_json["target_modules"])
    from safetensors.torch import load_file

    a = load_file(path / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inject_at_init_is_identity_and_trains_only_vectors():
    ref = _logits(tiny_llama())
    model = fp.inject(tiny_llama(), fp.IA3Config(target_modules=TARGETS, feedforward_modules=FF))
    assert rel_err(_logits(model), ref) <= 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("adapters.default.ia3_l") for n in trainable)
    assert len(trainable) == 6
    model.train()
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_merge_unmerge_and_unload(tmp_path):
    path, ref = _peft_adapter(tmp_path)
    model = fp.load_adapter(tiny_llama(), path)
    fp.merge(model)
    assert rel_err(_logits(model), ref) <= 1e-5
    fp.unmerge(model)
    assert rel_err(_logits(model), ref) <= 1e-5
    plain = fp.unload(model)
    assert not any(isinstance(m, IA3Linear) for m in plain.modules())
    assert rel_err(_logits(plain), ref) <= 1e-5


def test_round_trip_and_two_adapters(tmp_path):
    model = fp.inject(tiny_llama(), fp.IA3Config(target_modules=TARGETS, feedforward_modules=FF,
                                                 init_ia3_weights=False))
    fp.inject(model, fp.IA3Config(target_modules=["v_proj"], init_ia3_weights=False), adapter_name="other")
    a = _logits(model)
    fp.set_adapter(model, "other")
    b = _logits(model)
    assert rel_err(a, b) > 1e-3
    fp.save_adapter(model, tmp_path / "default", "default")
    fp.save_adapter(model, tmp_path / "other", "other")
    fresh = fp.load_adapter(tiny_llama(), tmp_path / "default")
    fp.load_adapter(fresh, tmp_path / "other", "other")
    assert rel_err(_logits(fresh), a) <= 1e-6
    fresh.eval()
    ids = _ids(3)
    with fp.batch_adapters(fresh, ["other", None, "default"]):
        mixed = _logits(fresh, ids)
    fp.set_adapter(fresh, "other")
    assert rel_err(mixed[0], _logits(fresh, ids)[0]) <= 1e-6
    fp.set_adapter(fresh, None)
    assert rel_err(mixed[1], _logits(fresh, ids)[1]) <= 1e-6


def test_gpt2_conv1d(tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    cfg = dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], init_ia3_weights=False,
               fan_in_fan_out=True)
    peft_model = get_peft_model(tiny_gpt2(), PeftIA3Config(**cfg)).eval()
    peft_model.save_pretrained(tmp_path / "g")
    model = fp.load_adapter(tiny_gpt2(), tmp_path / "g")
    assert rel_err(_logits(model), _logits(peft_model)) <= 1e-5


def test_target_not_found_changes_nothing():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match="matched no module"):
        fp.inject(model, fp.IA3Config(target_modules=["nope_proj"]))
    assert _same_state(model, before) and not any(isinstance(m, IA3Linear) for m in model.modules())


def test_bad_configs():
    with pytest.raises(ValueError, match="subset of target_modules"):
        fp.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        fp.IA3Config(target_modules=["k_proj"], init_ia3_weights="yes")


def test_wrong_vector_shape_in_checkpoint_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = _peft_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.ia3_l"
    tensors[key] = tensors[key].reshape(1, -1).contiguous()  # (16, 1) -> (1, 16)
    save_file(tensors, path / "adapter_model.safetensors")
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"v_proj.ia3_l has shape \(1, 16\), made for feed-forward .*but the "
                                         r"config's feedforward_modules make .*v_proj output scaling"):
        fp.load_adapter(model, path)
    assert _same_state(model, before) and not any(isinstance(m, IA3Linear) for m in model.modules())
    tensors[key] = torch.ones(3, 1)  # another size altogether: another base model
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"v_proj.ia3_l has shape \(3, 1\) but the model expects \(16, 1\)"):
        fp.load_adapter(model, path)
    assert _same_state(model, before)


def test_training_gradients_match_peft(tmp_path):
    """One loss, same adapter: fastpeft's ia3_l gradients equal PEFT's (fp32)."""
    from peft import PeftModel

    path, _ = _peft_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    model = fp.load_adapter(tiny_llama(), path, is_trainable=True)
    ids = _ids()
    peft_model.train()
    model.train()
    peft_model(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    theirs = {n.replace("base_model.model.", "").replace(".ia3_l.default", ""): p.grad
              for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n.replace(".adapters.default.ia3_l", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for name in ours:
        assert rel_err(ours[name], theirs[name].double()) <= 1e-5, name


def test_inject_accepts_a_peft_config_object():
    from peft import IA3Config as PeftIA3Config

    model = fp.inject(tiny_llama(), PeftIA3Config(target_modules=TARGETS, feedforward_modules=FF))
    config = model.fastpeft_config["default"]
    assert isinstance(config, fp.IA3Config) and config.feedforward_modules == FF
    assert sum(isinstance(m, IA3Linear) for m in model.modules()) == 6


def test_peft_adapter_on_a_half_model_matches_peft_in_half(tmp_path, kernel_calls):
    """fp16 model, (IA)^3 vectors kept in fp32 (autocast_adapter_dtype): as close to the
    fp32 result as PEFT's own fp16 run is."""
    from peft import PeftModel

    path, ref32 = _peft_adapter(tmp_path)
    model = fp.load_adapter(tiny_llama().half(), path)
    assert model.model.layers[0].self_attn.k_proj.ia3_vector.dtype == torch.float32
    ours = _logits(model)
    theirs = _logits(PeftModel.from_pretrained(tiny_llama().half(), path).eval())
    assert ours.dtype == torch.float16
    assert rel_err(ours.float(), ref32) <= max(2 * rel_err(theirs.float(), ref32), 2e-3)
