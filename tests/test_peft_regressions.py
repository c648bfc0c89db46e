"""Model-level behaviours a review found wrong against PEFT, kept fixed: switching
adapters on a merged model, undo after a failed load or merge, trainable flags, mixed
batches after direct weight edits, modules_to_save around keyword-called modules,
"all-linear" next to modules_to_save, default targets that keep user fields, saves that
replace an older format, and pool LRU order under batch_adapters."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402

import fastpeft as fp  # noqa: E402

from numerics import rel_err  # noqa: E402
from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402


def _llama(attention_bias=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, attention_bias=attention_bias,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _two_adapters(model, b_kwargs=None):
    fp.inject(model, fp.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    fp.inject(model, fp.LoraConfig(r=2, init_lora_weights=False, **(b_kwargs or {"target_modules": ["v_proj"]})), "b")
    return model


def _logits_of(model, name, ids):
    fp.set_adapter(model, name)
    return logits(model, ids)


def test_set_adapter_on_a_merged_model_unmerges_first():
    ids = input_ids()
    model = _two_adapters(_llama())
    want_a, want_base = _logits_of(model, "a", ids), _logits_of(model, None, ids)
    fp.set_adapter(model, "b")
    fp.merge(model)
    with pytest.warns(UserWarning, match="unmerging"):
        fp.set_adapter(model, "a")
    assert rel_err(logits(model, ids), want_a) < 1e-6
    fp.merge(model)
    with pytest.warns(UserWarning):
        fp.set_adapter(model, None)
    assert rel_err(logits(model, ids), want_base) < 1e-6


def test_failed_load_keeps_the_base_model_running(tmp_path):
    ids = input_ids()
    model = _two_adapters(_llama())
    fp.set_adapter(model, None)
    base = logits(model, ids)
    other = peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100)), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path)  # an adapter for another base: shapes do not fit
    with pytest.raises(ValueError):
        fp.load_adapter(model, tmp_path, "c")
    assert fp.active_adapter(model) is None
    assert rel_err(logits(model, ids), base) == 0.0


def test_failed_merge_rolls_back_only_itself():
    model = _llama(attention_bias=True)
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                                   lora_bias=True), "a")
    fp.set_adapter(model, "a")
    fp.merge(model, "b")
    before = logits(model, input_ids())
    with pytest.raises(ValueError, match="no bias"):
        fp.merge(model, "a")  # down_proj has no base bias to take lora_bias
    assert rel_err(logits(model, input_ids()), before) < 1e-6  # a's partial merge undone, b kept
    merged = {n: list(l.merged_adapters) for n, l in model.named_modules() if isinstance(l, fp.FastLoRALinear)}
    assert all(v == ["b"] for n, v in merged.items() if "q_proj" in n or "v_proj" in n), merged


def test_trainable_flags_follow_peft():
    model = _two_adapters(_llama())
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert fp.trainable_parameters(model)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    frozen = fp.inject(_llama(), fp.LoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    assert fp.trainable_parameters(frozen)[0] == 0


def test_mixed_batch_sees_direct_data_edits_between_batches():
    ids = input_ids(batch=2)
    model = _two_adapters(_llama())
    with torch.no_grad(), fp.batch_adapters(model, ["a", "b"]):
        model(ids)
    for name, p in model.named_parameters():
        if name.endswith("adapters.a.lora_B"):
            p.data.zero_()  # no version bump: the next batch must still see it
    with torch.no_grad(), fp.batch_adapters(model, ["a", "b"]):
        mixed = model(ids).logits
    assert rel_err(mixed[0], _logits_of(model, "a", ids)[0]) < 1e-5
    assert rel_err(mixed[0], _logits_of(model, None, ids)[0]) < 1e-5  # a is now a no-op


def test_modules_to_save_around_a_keyword_called_module(tmp_path):
    """HF calls attention with keywords only; the wrapper's copy must run (it is
    perturbed here, so running the original instead would show)."""
    ids = input_ids()
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["down_proj"],
                                                           modules_to_save=["self_attn"], init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, ids)
    assert rel_err(expected, logits(_llama(), ids)) > 1e-3
    model = fp.load_adapter(_llama(), str(tmp_path))
    assert rel_err(logits(model, ids), expected) < 1e-5
    fp.set_adapter(model, None)  # the original modules run again
    assert rel_err(logits(model, ids), logits(_llama(), ids)) < 1e-5


def test_all_linear_second_adapter_next_to_a_wrapped_embedding():
    model = fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "a")
    fp.inject(model, fp.LoraConfig(r=2, target_modules="all-linear"), "b")
    assert "b" in fp.adapter_names(model)


def test_ia3_defaults_keep_the_users_feedforward_modules():
    model = fp.inject(_llama(), fp.IA3Config(feedforward_modules=["v_proj"]))
    config = model.fastpeft_config["default"]
    assert config.feedforward_modules == ["v_proj"] and "v_proj" in config.target_modules


def test_save_replaces_an_older_file_of_the_other_format(tmp_path):
    ids = input_ids()
    first = fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fp.save_adapter(first, tmp_path)
    second = fp.inject(tiny_llama(seed=3), fp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fp.save_adapter(second, tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    loaded = fp.load_adapter(_llama(), tmp_path)
    second_on_this_base = fp.load_adapter(_llama(), tmp_path)
    assert rel_err(logits(loaded, ids), logits(second_on_this_base, ids)) == 0.0
    saved = dict(second.named_parameters())
    for name, p in loaded.named_parameters():
        if name.endswith(".lora_B"):
            assert torch.equal(p, saved[name].detach())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2


def test_batch_adapters_refreshes_the_pool_lru_order():
    model = fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"]))
    pool = fp.AdapterPool(model, max_adapters=2, max_rank=4)
    K = 32
    for name in ("x", "y"):
        pool.load(name, {p: (torch.randn(2, K), torch.randn(K, 2)) for p in pool.layers}, lora_alpha=2)
    ids = input_ids(batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("x", "y", "x"):
            with torch.no_grad(), fp.batch_adapters(model, [name]):
                model(ids)
    assert pool.adapters == ["y", "x"]  # x was used last: y goes first when full


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "torch"), (torch.float16, "auto")])
def test_adapters_stay_fp32_on_a_half_precision_model_as_in_peft(tmp_path, dtype, backend):
    """PEFT's autocast_adapter_dtype: on an fp16/bf16 model the adapter is kept in fp32
    (loaded without rounding); outputs match PEFT's. fp16 runs the Triton kernels here
    (fp32 adapters on an fp16 base); bf16 the reference (the interpreter has no bf16 dot)."""
    ids = input_ids()
    made = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    made.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_llama().to(dtype), tmp_path)
    ours = fp.load_adapter(_llama().to(dtype), tmp_path, backend=backend)
    lora = [p for n, p in ours.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == dtype for n, p in ours.named_parameters() if "lora_" not in n)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < tol
    kept = fp.inject(_llama().to(dtype), fp.LoraConfig(r=2, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for n, p in kept.named_parameters() if "lora_" in n)


def test_modules_to_save_around_adapter_layers_is_refused_and_changes_nothing():
    model = fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    from tiny_models import snapshot, assert_same_snapshot

    before = snapshot(model)
    with pytest.raises(ValueError, match="holds adapter layers"):
        fp.inject(model, fp.LoraConfig(r=2, target_modules=["down_proj"], modules_to_save=["self_attn"]), "b")
    assert_same_snapshot(before, snapshot(model))


def _peft_counts(model):
    return model.get_nb_trainable_parameters()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_are_refused_on_load(tmp_path, init):
    """PEFT re-runs PiSSA/OLoRA on load, rewriting the base (W - s B0 A0): loading the
    saved weights over the plain base would give wrong outputs, so it is refused."""
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    theirs.save_pretrained(tmp_path)
    model = _llama()
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="rewrites the base weights.*path_initial_model_for_weight_conversion"):
        fp.load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(NotImplementedError, match="rewrites the base weights"):
        fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "TOKEN_CLS"])
def test_task_head_is_trained_and_saved_as_peft_does(tmp_path, task_type):
    config = dict(r=2, target_modules=["query", "value"], task_type=task_type)
    model = fp.inject(tiny_bert(), fp.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**config))
    assert fp.trainable_parameters(model) == _peft_counts(theirs)
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)  # a trained head
    fp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) == {"classifier", "score"}
    ids = input_ids()
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert rel_err(logits(back, ids), logits(model, ids)) < 1e-5


def test_lora_bias_on_a_half_model_without_base_bias_runs_on_the_reference():
    """fp32 adapter (autocast_adapter_dtype) with lora_bias on an fp16 layer without bias."""
    config = fp.LoraConfig(r=2, target_modules=["down_proj"], lora_bias=True, init_lora_weights=False)
    full = fp.inject(_llama(), config, backend="torch")
    half = _llama().half()
    fp.inject(half, config, backend="torch")
    half.load_state_dict(full.state_dict())
    layer = half.model.layers[0].mlp.down_proj
    assert layer.bias is None and layer.adapters["default"].lora_bias.dtype == torch.float32
    ids = input_ids()
    assert rel_err(logits(half, ids).float(), logits(full, ids)) < 2e-2


def test_bad_lora_alpha_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match="lora_alpha must be a number"):
        fp.LoraConfig(lora_alpha="16")
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be a number"):
        fp.LoraConfig(alpha_pattern={"q_proj": None})
    layer = fp.FastLoRALinear(8, 6, r=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        layer.add_adapter("b", 2, "16")
    assert layer.adapter_names == ["default"] and "b" not in layer.adapters
    assert layer.state_dict().keys() == before.keys()


def test_deleting_the_active_adapter_activates_and_trains_the_next_as_peft():
    model = _two_adapters(_llama())
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    fp.delete_adapter(model, "a")
    theirs.delete_adapter("a")
    assert fp.active_adapter(model) == "b"
    assert fp.trainable_parameters(model) == _peft_counts(theirs)
    assert fp.trainable_parameters(model)[0] > 0


def test_bias_all_keeps_the_wrapped_original_frozen():
    config = dict(r=2, target_modules=["down_proj"], modules_to_save=["self_attn"], bias="all")
    model = fp.inject(_llama(attention_bias=True), fp.LoraConfig(**config))
    theirs = peft.get_peft_model(_llama(attention_bias=True), peft.LoraConfig(**config))
    assert fp.trainable_parameters(model) == _peft_counts(theirs)
    assert not any(p.requires_grad for p in model.model.layers[0].self_attn.original_module.parameters())


def test_targeting_a_tied_lm_head_keeps_the_tie_and_counts_it_once():
    config = dict(r=2, target_modules=["c_attn", "lm_head"])
    model = fp.inject(tiny_gpt2(), fp.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**config))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert fp.trainable_parameters(model) == _peft_counts(theirs)
    fp.unload(model, merge_adapter=False)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_mica_adapter_loads_and_trains_only_lora_A(tmp_path):
    """MiCA (init_lora_weights="mica") changes nothing on the base; PEFT freezes its B."""
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="mica")
    theirs = peft.get_peft_model(_llama(), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name:
                p.normal_()  # a trained A (MiCA starts it at zero)
    theirs.save_pretrained(tmp_path)
    ids = input_ids()
    model = fp.load_adapter(_llama(), tmp_path, is_trainable=True)
    assert rel_err(logits(model, ids), logits(theirs, ids)) < 1e-5
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_A" in n for n in trained)
    back = peft.PeftModel.from_pretrained(_llama(), tmp_path, is_trainable=True)
    assert fp.trainable_parameters(model) == _peft_counts(back)


def test_task_type_on_a_model_without_that_head_is_accepted_as_peft():
    """PEFT adds classifier/score for SEQ_CLS even where the model has neither (a causal
    LM): no error, nothing wrapped; a user's own modules_to_save must still match."""
    config = dict(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    model = fp.inject(_llama(), fp.LoraConfig(**config))
    assert fp.trainable_parameters(model) == _peft_counts(peft.get_peft_model(_llama(), peft.LoraConfig(**config)))
    with pytest.raises(ValueError, match="matched no module"):
        fp.inject(_llama(), fp.LoraConfig(modules_to_save=["nothing_here"], **config))


def test_pool_refuses_base_rewriting_inits(tmp_path):
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path)
    model = fp.inject(_llama(), fp.LoraConfig(r=2, target_modules=["q_proj"]))
    pool = fp.AdapterPool(model, max_adapters=2, max_rank=4)
    with pytest.raises(fp.AdapterError, match="rewrites the base weights"):
        pool.load("pissa", tmp_path)
    assert pool.adapters == []
