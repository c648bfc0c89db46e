"""LLaMA-Adapter (adaption prompts) against the real ``peft``: the same logits and greedy
generation both ways, checkpoints both ways, training parity, adapter management and
clear errors that leave the model unchanged. Tiny Llama built locally (2 layers)."""
from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastpeft as fp  # noqa: E402
from fastpeft.core.checkpoint import AdapterCheckpointError  # noqa: E402
from fastpeft.methods.llama_adapter.layer import AdaptedAttention  # noqa: E402
from tiny_models import assert_same_snapshot, input_ids, snapshot, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def peft_config(adapter_len=3, adapter_layers=2, **kw):
    return peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                     task_type="CAUSAL_LM", **kw)


def peft_model(adapter_len=3, adapter_layers=2, gate=0.5, seed=7):
    """PEFT's model with non-zero gates (zero gates would hide the adapter)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(), peft_config(adapter_len, adapter_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(gate)
    return model.eval()


def prompts(model):
    """``{key without prefixes: tensor}`` of the adaption prompts and gates of a model."""
    out = {}
    for name, p in model.named_parameters():
        if "adaption_" in name:
            key = name.replace("base_model.model.", "").replace(".adapters.default", "")
            out[key.replace(".adapters.other", "")] = p
    return out


def copy_prompts(dst, src):
    """Copy the prompts and gates of model ``src`` into model ``dst`` (same keys)."""
    theirs = prompts(src)
    with torch.no_grad():
        for key, p in prompts(dst).items():
            p.copy_(theirs[key])


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def padded_batch():
    ids = input_ids(batch=3, seq=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as for generation
    mask[2, :1] = 0
    return ids, mask


def generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)


# --------------------------------------------------------------------- config


def test_config_matches_peft_fields_and_json(tmp_path):
    ours = fp.AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM")
    theirs = peft_config(4, 1).to_dict()
    assert ours.target_modules is None and ours.adapter_len == 4 and ours.adapter_layers == 1
    assert set(ours.to_dict()) <= set(theirs) | {"extra"}
    model = fp.inject(tiny_llama(), peft_config(4, 1))  # a peft config is accepted
    config = model.fastpeft_config["default"]
    assert isinstance(config, fp.AdaptionPromptConfig) and config.target_modules == "self_attn"
    fp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) - {"auto_mapping", "peft_version"} <= set(theirs)
    assert saved["target_modules"] == "self_attn" and saved["peft_type"] == "ADAPTION_PROMPT"


@pytest.mark.parametrize("bad, words", [
    (dict(adapter_len=0, adapter_layers=1), "adapter_len"),
    (dict(adapter_len=None, adapter_layers=1), "adapter_len"),
    (dict(adapter_len=2, adapter_layers=-1), "adapter_layers"),
    (dict(adapter_len=2, adapter_layers=1, target_modules=["self_attn"]), "one string"),
    (dict(adapter_len=2, adapter_layers=1, modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_bad_config_refused_model_unchanged(bad, words):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=words):
        fp.inject(model, fp.AdaptionPromptConfig(**bad))
    assert_same_snapshot(before, snapshot(model))


def test_too_many_layers_and_unsupported_model_refused_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter_layers=3.*only 2"):
        fp.inject(model, fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    assert_same_snapshot(before, snapshot(model))
    bert = tiny_bert()
    before = snapshot(bert)
    with pytest.raises(ValueError, match="unsupported model type.*bert"):
        fp.inject(bert, fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="attention"))
    assert_same_snapshot(before, snapshot(bert))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.1.mlp'.*not an attention module"):
        fp.inject(model, fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="mlp"))
    assert_same_snapshot(before, snapshot(model))


# --------------------------------------------------------------------- forward and generation


def test_inject_wraps_top_layers_with_peft_init():
    """The same seed gives PEFT's prompts (drawn in the same order); zero gates: the base model."""
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft_config(3, 1))
    torch.manual_seed(3)
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    assert not isinstance(model.model.layers[0].self_attn, AdaptedAttention)
    assert isinstance(model.model.layers[1].self_attn, AdaptedAttention)
    ours, ref = prompts(model), prompts(theirs)
    assert ours.keys() == ref.keys() == {"model.layers.1.self_attn.adaption_prompt",
                                         "model.layers.1.self_attn.adaption_gate"}
    for key in ours:
        assert torch.equal(ours[key], ref[key])
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.layers.1.self_attn.adapters.default.adaption_prompt",
                         "model.layers.1.self_attn.adapters.default.adaption_gate"}


def test_logits_and_greedy_generation_match_peft():
    theirs = peft_model(adapter_len=3, adapter_layers=2)
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    copy_prompts(model, theirs)
    ids, mask = padded_batch()
    expected = logits(theirs, ids, mask)
    assert (expected - logits(tiny_llama(), ids, mask)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(model, ids, mask), expected, **TOL)
    assert torch.equal(generate(model, ids, mask), generate(theirs, ids, mask))


def test_labels_loss_matches_peft():
    theirs = peft_model()
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    copy_prompts(model, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        ref = theirs(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(ours, ref, **TOL)


def test_inputs_embeds_and_fp16_match_peft(tmp_path):
    """``inputs_embeds`` input; an fp16 model (fastpeft keeps the adapter in fp32 as its
    autocast_adapter_dtype does, and computes in fp16 as PEFT does: the same logits)."""
    theirs = peft_model()
    theirs.save_pretrained(tmp_path)
    model = fp.load_adapter(tiny_llama(), tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask).logits,
                                   logits(theirs, ids, mask), **TOL)
    half = fp.load_adapter(tiny_llama().half(), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if "adaption_" in n)
    out = logits(half, ids, mask)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, logits(theirs.half(), ids, mask), rtol=1e-3, atol=1e-3)


def test_gpt2_matches_peft_both_ways(tmp_path):
    """GPT-2 (PEFT's AdaptedAttentionGPT: c_attn parts, no output projection on the
    adapter term): logits and greedy generation, PEFT's checkpoint in, ours out."""
    torch.manual_seed(4)
    theirs = peft.get_peft_model(tiny_gpt2(), peft_config(3, 1))
    with torch.no_grad():
        next(p for n, p in theirs.named_parameters() if n.endswith("adaption_gate")).fill_(0.6)
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = fp.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert model.fastpeft_config["default"].target_modules == "attn"
    ids, mask = padded_batch()
    expected = logits(theirs, ids, mask)
    assert (expected - logits(tiny_gpt2(), ids, mask)).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, ids, mask), expected, **TOL)
    assert torch.equal(generate(model, ids, mask), generate(theirs, ids, mask))
    fp.save_adapter(model, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again, ids, mask), expected, **TOL)


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def test_mistral_matches_peft(tmp_path):
    """Mistral (GQA with one key/value head): PEFT's checkpoint gives the same logits."""
    torch.manual_seed(6)
    theirs = peft.get_peft_model(tiny_mistral(), peft_config(2, 2))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.9)
    theirs.eval().save_pretrained(tmp_path)
    model = fp.load_adapter(tiny_mistral(), tmp_path)
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(theirs, ids, mask), **TOL)


# --------------------------------------------------------------------- checkpoints


def test_peft_checkpoint_loads_with_same_logits_and_generation(tmp_path):
    theirs = peft_model(adapter_len=4, adapter_layers=2)
    theirs.save_pretrained(tmp_path)
    model = fp.load_adapter(tiny_llama(), tmp_path)
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(model, ids, mask), logits(theirs, ids, mask), **TOL)
    assert torch.equal(generate(model, ids, mask), generate(theirs, ids, mask))
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference, as PEFT


def test_saved_directory_loads_in_peft_with_same_logits(tmp_path):
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with torch.no_grad():
        model.model.layers[1].self_attn.adapters["default"].adaption_gate.fill_(0.8)
    fp.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids, mask = padded_batch()
    torch.testing.assert_close(logits(theirs, ids, mask), logits(model, ids, mask), **TOL)
    assert torch.equal(generate(theirs, ids, mask), generate(model, ids, mask))


def _rewrite_config(path, **changes):
    file = path / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("change, words", [
    (dict(adapter_len=5), "holds 3 prompt tokens.*adapter_len=5"),
    (dict(adapter_layers=2), "adaption prompts for 1 layer.*adapter_layers=2"),
    (dict(adapter_layers=3), "adapter_layers=3.*only 2"),
])
def test_bad_checkpoint_clear_error_model_unchanged(tmp_path, change, words):
    peft_model(adapter_len=3, adapter_layers=1).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, **change)
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=2), "first")
    before = snapshot(model)
    with pytest.raises(ValueError, match=words):
        fp.load_adapter(model, tmp_path, "second")
    assert_same_snapshot(before, snapshot(model))


def test_bad_checkpoint_error_type_is_checkpoint_error(tmp_path):
    peft_model(adapter_len=3, adapter_layers=1).save_pretrained(tmp_path)
    _rewrite_config(tmp_path, adapter_len=2)
    with pytest.raises(AdapterCheckpointError):
        fp.load_adapter(tiny_llama(), tmp_path)


# --------------------------------------------------------------------- training


def test_training_matches_peft_loss_trajectory():
    """Same initial weights, same data, AdamW: the losses agree step by step and fall;
    only the prompts and gates move."""
    theirs = peft_model(gate=0.0)
    theirs.train()
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=2)).train()
    copy_prompts(model, theirs)
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    ids, mask = padded_batch()
    losses = []
    for m in (theirs, model):
        params = [p for p in m.parameters() if p.requires_grad]
        assert len(params) == 4 and all("adaption_" in n for n, p in m.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(params, lr=5e-2)
        run = []
        for _ in range(5):
            loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for key, value in model.state_dict().items():
        plain = key.replace("self_attn.base_layer.", "self_attn.")
        if plain in base:
            assert torch.equal(value, base[plain]), key
    copy = prompts(theirs)
    for key, p in prompts(model).items():
        torch.testing.assert_close(p, copy[key], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- several adapters


def test_set_adapter_delete_adapter_match_peft(tmp_path):
    first = peft_model(adapter_len=3, adapter_layers=2, gate=0.5, seed=1)
    second = peft_model(adapter_len=2, adapter_layers=1, gate=-0.7, seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = fp.load_adapter(tiny_llama(), tmp_path / "a", "a")
    fp.load_adapter(model, tmp_path / "b", "b")
    ids, mask = padded_batch()
    assert fp.active_adapter(model) == "a"
    torch.testing.assert_close(logits(model, ids, mask), logits(first, ids, mask), **TOL)
    fp.set_adapter(model, "b")
    torch.testing.assert_close(logits(model, ids, mask), logits(second, ids, mask), **TOL)
    assert torch.equal(generate(model, ids, mask), generate(second, ids, mask))
    fp.set_adapter(model, None)
    torch.testing.assert_close(logits(model, ids, mask), logits(tiny_llama(), ids, mask), rtol=0, atol=0)
    fp.set_adapter(model, "b")
    # Saving an inactive adapter writes its own tensors.
    fp.save_adapter(model, tmp_path / "a2", "a")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a2").eval()
    torch.testing.assert_close(logits(again, ids, mask), logits(first, ids, mask), **TOL)
    fp.delete_adapter(model, "b")
    assert fp.adapter_names(model) == ["a"] and fp.active_adapter(model) == "a"
    assert not hasattr(model.model.layers[1].self_attn.adapters, "b")
    torch.testing.assert_close(logits(model, ids, mask), logits(first, ids, mask), **TOL)


def test_same_name_twice_refused_unchanged():
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        fp.inject(model, fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    assert_same_snapshot(before, snapshot(model))


def test_not_mergeable_and_unload_without_merge():
    model = fp.inject(tiny_llama(), fp.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    with torch.no_grad():
        model.model.layers[1].self_attn.adapters["default"].adaption_gate.fill_(1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="ADAPTION_PROMPT adapters cannot be merged"):
        fp.merge(model)
    with pytest.raises(ValueError, match="cannot be merged.*merge_adapter=False"):
        fp.unload(model)
    assert_same_snapshot(before, snapshot(model))
    fp.unload(model, merge_adapter=False)
    assert not any(isinstance(m, AdaptedAttention) for m in model.modules())
    ids = input_ids()
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), rtol=0, atol=0)
    assert set(model.state_dict()) == set(tiny_llama().state_dict())


def test_mixed_batches_row_by_row(tmp_path):
    """Beyond PEFT: each row its own adapter (adapters over different layers and lengths),
    None rows the base model: logits and greedy generation equal each adapter run alone."""
    peft_model(adapter_len=3, adapter_layers=2, gate=0.5, seed=1).save_pretrained(tmp_path / "a")
    peft_model(adapter_len=2, adapter_layers=1, gate=-0.7, seed=2).save_pretrained(tmp_path / "b")
    model = fp.load_adapter(tiny_llama(), tmp_path / "a", "a")
    fp.load_adapter(model, tmp_path / "b", "b")
    ids, mask = padded_batch()
    names = ["b", None, "a"]
    alone = {}
    for name in ("a", "b", None):
        fp.set_adapter(model, name)
        alone[name] = (logits(model, ids, mask), generate(model, ids, mask))
    fp.set_adapter(model, "a")
    with fp.batch_adapters(model, names):
        mixed = logits(model, ids, mask)
        tokens = generate(model, ids, mask)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][0][row], **TOL)
        assert torch.equal(tokens[row], alone[name][1][row])
    torch.testing.assert_close(mixed[1], logits(tiny_llama(), ids, mask)[1], rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids, mask), alone["a"][0], rtol=0, atol=0)  # plan gone
    with pytest.raises(ValueError, match="2 adapter names.*batch size 3"):
        with fp.batch_adapters(model, ["a", "b"]):
            logits(model, ids, mask)


def test_lora_inside_wrapped_attention_is_refused_either_order():
    """LoRA on projections that an adaption prompt's wrapped attention holds (or the
    reverse order): a clear error naming the module, the model unchanged, never a LoRA
    that silently skips the wrapped layers."""
    model = tiny_llama()
    fp.inject(model, fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=1), "ap")
    before = snapshot(model)
    with pytest.raises(ValueError, match="lies inside"):
        fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora")
    assert_same_snapshot(before, snapshot(model))
    other = tiny_llama()
    fp.inject(other, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lora")
    before = snapshot(other)
    with pytest.raises(ValueError):
        fp.inject(other, fp.AdaptionPromptConfig(adapter_len=3, adapter_layers=1), "ap")
    assert_same_snapshot(before, snapshot(other))
