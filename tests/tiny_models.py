"""Tiny random transformers models built from config classes (nothing is downloaded).

Each builder seeds torch, so two calls give the same weights: one copy for PEFT, one
for fastpeft. Sizes are tiny (hidden 32, 2 layers, vocab 100) so that the Triton
interpreter runs a forward in well under a second.
"""
from __future__ import annotations

import torch

VOCAB = 100


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,  # biases on q/k/v/o so bias="all"/"lora_only" have something to train
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def input_ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model):
    """Everything that ``bad input changes nothing`` must keep: tensors (by value),
    module types by path, requires_grad flags, training flags and fastpeft state."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "adapters": dict(model.__dict__.get("fastpeft_config") or {}),
        "active": model.__dict__.get("fastpeft_active"),
        # No trace at all: the model's own attributes (a {} or None added counts), the
        # very module objects at each path, and each adapter layer's active adapter.
        "attrs": sorted(model.__dict__),
        "modules": {n: id(m) for n, m in model.named_modules()},
        "layer_active": {n: getattr(m, "active_adapter") for n, m in model.named_modules()
                         if n and hasattr(m, "active_adapter")},
    }


def assert_same_snapshot(before, after):
    assert before["types"] == after["types"], "module structure changed"
    assert before["state"].keys() == after["state"].keys(), "state_dict keys changed"
    for k, v in before["state"].items():
        w = after["state"][k]
        same = v.shape == w.shape and v.dtype == w.dtype and torch.equal(v.isnan(), w.isnan()) and torch.equal(
            v.nan_to_num(0.0), w.nan_to_num(0.0)) if v.is_floating_point() else torch.equal(v, w)
        assert same, f"tensor {k} changed"
    assert before["grad"] == after["grad"], "requires_grad flags changed"
    assert before["training"] == after["training"], "train/eval flags changed"
    assert before["adapters"].keys() == after["adapters"].keys(), "adapter set changed"
    assert before["active"] == after["active"], "active adapter changed"
    assert before["attrs"] == after["attrs"], f"model attributes changed: {before['attrs']} -> {after['attrs']}"
    assert before["modules"] == after["modules"], "module objects changed"
    assert before["layer_active"] == after["layer_active"], "a layer's active adapter changed"
