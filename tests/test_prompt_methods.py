"""Soft prompts (prompt tuning, P-tuning, prefix tuning) against the real ``peft``.

Greedy generation is compared with a no-cache greedy loop over ``PeftModel``'s forward
(whose logits fastpeft matches exactly): PEFT 0.21.2's own ``generate`` is wrong for
prompt learning under transformers 5.24 on these models (it still sets
``cache_position``, which transformers no longer reads, so later decode steps run at
the wrong positions), so it is no oracle.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft as fp

peft = pytest.importorskip("peft")

from tiny_models import assert_same_snapshot, input_ids, snapshot, tiny_gpt2, tiny_llama  # noqa: E402

N = 4
CONFIGS = {
    "prompt": lambda: dict(peft_type="PROMPT_TUNING", num_virtual_tokens=N),
    "ptune_mlp": lambda: dict(peft_type="P_TUNING", num_virtual_tokens=N, encoder_hidden_size=16),
    "ptune_lstm": lambda: dict(
        peft_type="P_TUNING", num_virtual_tokens=N, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
    "prefix": lambda: dict(peft_type="PREFIX_TUNING", num_virtual_tokens=N),
    "prefix_proj": lambda: dict(peft_type="PREFIX_TUNING", num_virtual_tokens=N, prefix_projection=True,
                                encoder_hidden_size=16),
}
PEFT_CLS = {"PROMPT_TUNING": "PromptTuningConfig", "P_TUNING": "PromptEncoderConfig", "PREFIX_TUNING": "PrefixTuningConfig"}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def peft_config(kind: str):
    fields = CONFIGS[kind]()
    return getattr(peft, PEFT_CLS[fields.pop("peft_type")])(task_type="CAUSAL_LM", **fields)


def fp_config(kind: str):
    fields = CONFIGS[kind]()
    return getattr(fp, PEFT_CLS[fields.pop("peft_type")])(task_type="CAUSAL_LM", **fields)


def run(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **kw)


def greedy(model, ids, steps: int = 4):
    """Greedy continuation without a cache (the oracle for ``generate``): a row that
    emitted the end-of-sequence token continues with it, as ``generate`` pads."""
    eos = model.config.eos_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long), out[:, -1].argmax(-1))
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids


def generate(model, ids, steps: int = 4):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)


def perturb(model, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- checkpoints both ways


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_checkpoint_into_fastpeft(arch, kind, tmp_path):
    build = BUILDERS[arch]
    torch.manual_seed(3)
    pm = peft.get_peft_model(build(), peft_config(kind)).eval()
    pm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    model = fp.load_adapter(build(), tmp_path)
    ids = input_ids()
    want, got = run(pm, ids), run(model, ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert generate(model, ids).tolist() == greedy(pm, ids).tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fastpeft_save_into_peft(arch, kind, tmp_path):
    build = BUILDERS[arch]
    model = fp.inject(build(), fp_config(kind))
    perturb(model)
    model.eval()
    fp.save_adapter(model, tmp_path)
    assert list(load_file(str(tmp_path / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    pm = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    ids = input_ids()
    torch.testing.assert_close(run(pm, ids).logits, run(model, ids).logits, rtol=1e-5, atol=1e-5)
    assert generate(model, ids).tolist() == greedy(pm, ids).tolist()
    # And back: the saved directory loads into fastpeft with the same logits.
    again = fp.load_adapter(build(), tmp_path)
    torch.testing.assert_close(run(again, ids).logits, run(model, ids).logits, rtol=1e-5, atol=1e-5)


def test_generate_matches_peft_generate_where_peft_is_right():
    """GPT-2 prompt tuning: PEFT's own generate is right there; fastpeft's agrees."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny_gpt2(), peft_config("prompt")).eval()
    model = fp.inject(tiny_gpt2(), fp_config("prompt"))
    model.prompt_encoder.adapters["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    ids = input_ids()
    assert generate(model, ids).tolist() == generate(pm, ids).tolist()


# ----------------------------------------------------------------------------- the HF model keeps working


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_inputs_embeds_and_positional_input_ids(kind):
    model = fp.inject(tiny_llama(), fp_config(kind)).eval()
    ids = input_ids()
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        positional = model(ids).logits
    torch.testing.assert_close(by_embeds, by_ids)
    torch.testing.assert_close(positional, by_ids)
    assert by_ids.shape[1] == ids.shape[1] + (N if kind == "prompt" else 0)


def test_prompt_tuning_inits():
    class Tok:  # any callable returning {"input_ids": [...]} serves as the tokenizer
        def __call__(self, text):
            return {"input_ids": [5, 6, 7]}

    model = tiny_llama()
    words = model.get_input_embeddings().weight.detach().clone()
    cfg = fp.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer=Tok())
    fp.inject(model, cfg)
    torch.testing.assert_close(model.prompt_encoder.adapters["default"].embedding.weight.detach(), words[[5, 6, 7, 5, 6]])
    assert "tokenizer" not in cfg.to_dict()
    fp.inject(model, fp.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"), "s")
    rows = model.prompt_encoder.adapters["s"].embedding.weight.detach()
    assert all(any(torch.equal(r, w) for w in words) for r in rows)
    with pytest.raises(ValueError, match="tokenizer"):
        fp.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")


# ----------------------------------------------------------------------------- training parity


@pytest.mark.parametrize("kind", ["prompt", "ptune_mlp", "ptune_lstm", "prefix", "prefix_proj"])
def test_training_matches_peft(kind):
    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny_llama(), peft_config(kind))
    model = fp.inject(tiny_llama(), fp_config(kind))
    mine = model.prompt_encoder.adapters["default"]
    mine.load_state_dict(pm.prompt_encoder["default"].state_dict())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("prompt_encoder.adapters.default.") for n in trained)
    assert len(trained) == len([p for p in pm.parameters() if p.requires_grad])
    pm.train(), model.train()
    ids = input_ids()
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (pm, model)]
    losses = {0: [], 1: []}
    for _ in range(4):
        for i, (m, opt) in enumerate(zip((pm, model), opts)):
            loss = m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    assert losses[1][-1] < losses[1][0]


# ----------------------------------------------------------------------------- bad checkpoints


def _saved(tmp_path, kind="prompt", build=tiny_llama):
    model = fp.inject(build(), fp_config(kind))
    fp.save_adapter(model, tmp_path)
    return tmp_path


def _edit(path, key, value, tensor_shape):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[key] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_shape is not None:
        save_file({"prompt_embeddings": torch.zeros(tensor_shape)}, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "kind, key, value, shape, match",
    [
        ("prompt", "num_virtual_tokens", 4, (5, 32), "virtual tokens"),
        ("prompt", "token_dim", 48, (4, 48), "token_dim=48"),
        ("prompt", None, None, (4, 40), "width 40"),
        ("prefix", "num_layers", 3, (4, 3 * 2 * 16), "num_layers=3"),
        ("prefix", None, None, (4, 3 * 2 * 16), "num_layers"),
    ],
)
def test_bad_checkpoints_refused_model_unchanged(tmp_path, kind, key, value, shape, match):
    path = _saved(tmp_path, kind)
    _edit(path, key or "peft_type", value if key else json.loads((path / "adapter_config.json").read_text())["peft_type"], shape)
    model = fp.inject(tiny_llama(), fp.LoraConfig(target_modules=["q_proj"]), "lora")
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        fp.load_adapter(model, path, "soft")
    assert_same_snapshot(before, snapshot(model))
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks


# ----------------------------------------------------------------------------- switching, deleting


def test_switch_between_soft_prompts_and_lora(capsys):
    ids = input_ids()
    model = tiny_llama()
    base = run(model, ids).logits
    fp.inject(model, fp_config("prompt"), "pt")
    fp.inject(model, fp_config("prefix"), "px")
    fp.inject(model, fp.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False), "lora")
    perturb(model)
    model.eval()
    alone = {}
    for name in ("pt", "px", "lora"):
        fp.set_adapter(model, name)
        alone[name] = run(model, ids).logits
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(f".{name}." in n for n in trained), trained
    assert alone["pt"].shape[1] == ids.shape[1] + N and alone["px"].shape == base.shape
    assert (alone["lora"] - base).abs().max() > 1e-4 and (alone["px"] - base).abs().max() > 1e-4
    fp.set_adapter(model, "pt")
    torch.testing.assert_close(run(model, ids).logits, alone["pt"])
    fp.print_trainable_parameters(model)
    assert "trainable params" in capsys.readouterr().out
    fp.delete_adapter(model, "pt")
    fp.set_adapter(model, "px")
    torch.testing.assert_close(run(model, ids).logits, alone["px"])
    fp.set_adapter(model, None)
    torch.testing.assert_close(run(model, ids).logits, base)
    fp.delete_adapter(model, "px")
    fp.set_adapter(model, "lora")
    torch.testing.assert_close(run(model, ids).logits, alone["lora"])


# ----------------------------------------------------------------------------- mixed prompt batches


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_prompt_batches_row_by_row(arch):
    build = BUILDERS[arch]
    model = build()
    ids = input_ids(batch=3)
    base = run(model, ids).logits
    fp.inject(model, fp_config("prompt"), "a")
    fp.inject(model, fp_config("ptune_mlp"), "b")
    perturb(model)
    model.eval()
    alone = {}
    for name in ("a", "b"):
        fp.set_adapter(model, name)
        alone[name] = run(model, ids).logits
    with fp.batch_adapters(model, ["a", None, "b"]):
        mixed = run(model, ids).logits
    torch.testing.assert_close(mixed[0], alone["a"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1, N:], base[1], rtol=1e-5, atol=1e-5)  # masked-out virtual tokens
    torch.testing.assert_close(mixed[2], alone["b"][2], rtol=1e-5, atol=1e-5)
    # Generation with the KV cache, row by row.
    with fp.batch_adapters(model, ["b", "a", None]):
        got = generate(model, ids)
    for row, name in enumerate(["b", "a", None]):
        fp.set_adapter(model, name)
        assert got[row].tolist() == generate(model, ids[row:row + 1])[0].tolist()


def test_mixed_prompt_batches_refuse_unequal_lengths_and_prefixes():
    model = fp.inject(tiny_llama(), fp_config("prompt"), "a")
    fp.inject(model, fp.PromptTuningConfig(num_virtual_tokens=N + 1), "long")
    fp.inject(model, fp_config("prefix"), "px")
    model.eval()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        with fp.batch_adapters(model, ["a", "long", None]):
            run(model, input_ids())
    with pytest.raises(ValueError, match="mixed batches"):
        with fp.batch_adapters(model, ["a", "px", None]):
            pass


# ----------------------------------------------------------------------------- sequence classification


@pytest.mark.parametrize("kind", ["prompt", "ptune_mlp"])
def test_sequence_classification_both_ways(kind, tmp_path):
    from tiny_models import tiny_bert

    fields = CONFIGS[kind]()
    cls = PEFT_CLS[fields.pop("peft_type")]
    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny_bert(), getattr(peft, cls)(task_type="SEQ_CLS", **fields)).eval()
    with torch.no_grad():
        pm.base_model.classifier.modules_to_save["default"].weight.mul_(3)
    pm.save_pretrained(tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft").eval()
    model = fp.load_adapter(tiny_bert(), tmp_path / "peft")
    ids = input_ids()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.ones_like(ids),
              labels=torch.tensor([0, 2, 1]))
    with torch.no_grad():
        want, got = pm(**kw), model(**kw)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    fp.save_adapter(model, tmp_path / "fp")
    assert sorted(load_file(str(tmp_path / "fp" / "adapter_model.safetensors"))) == [
        "base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "fp").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, want.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="prefix tuning with task_type SEQ_CLS"):
        fp.inject(tiny_bert(), fp.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))


def test_trainable_loads(tmp_path):
    """is_trainable=True: as PEFT, P-tuning gets a fresh encoder over the loaded
    embeddings; a projected prefix (only its output was saved) is refused."""
    model = fp.inject(tiny_llama(), fp_config("ptune_mlp"))
    fp.save_adapter(model, tmp_path / "pt")
    loaded = fp.load_adapter(tiny_llama(), tmp_path / "pt", is_trainable=True)
    enc = loaded.prompt_encoder.adapters["default"]
    torch.testing.assert_close(enc.embedding.weight.detach(), model.prompt_encoder.adapters["default"].tokens().detach())
    assert enc.has_encoder and all(p.requires_grad for p in enc.parameters())
    model = fp.inject(tiny_llama(), fp_config("prefix_proj"))
    fp.save_adapter(model, tmp_path / "px")
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="prefix_projection=True"):
        fp.load_adapter(fresh, tmp_path / "px", is_trainable=True)
    assert_same_snapshot(before, snapshot(fresh))
    fp.load_adapter(fresh, tmp_path / "px")  # for inference it loads


def test_unload_removes_the_hook():
    model = tiny_llama()
    ids = input_ids()
    base = run(model, ids).logits
    fp.inject(model, fp_config("prompt"))
    fp.unload(model, merge_adapter=False)
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks
    torch.testing.assert_close(run(model, ids).logits, base)
