"""Mixed-adapter batches under ``torch.compile``: one graph, no breaks, eager's numbers.

Both LoRA paths (the layers' own adapters, an attached ``AdapterPool``) and the (IA)^3
and bottleneck layers' mixed batches compile with ``fullgraph=True``; the rows of a
batch are graph inputs (a new mix of names of the same batch size reuses the graph);
weights changed between compiled calls are seen. Compile on CPU is slow: ``aot_eager``
(dynamo plus AOT autograd, the Triton kernels run in the interpreter inside the custom
ops, which are opaque to dynamo) for most checks, inductor once on a small model.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import DEVICE
from numerics import rel_err
from tiny_models import input_ids, tiny_llama

import fastpeft as fp
from fastpeft.methods.bottleneck.layer import BottleneckLinear
from fastpeft.methods.ia3.layer import IA3Linear
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.serving.pool import AdapterPool


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()



def _no_breaks(model: nn.Module, *args, **kwargs) -> None:
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    reasons = [r.reason for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


# ----------------------------------------------------------------------------- LoRA, model level


def _llama_two_adapters() -> nn.Module:
    """Adapter "a" on q/v/down, "b" (another rank) on q/o only: layers b does not target
    run its rows on the base."""
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                   init_lora_weights=False), "a")
    fp.inject(model, fp.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"],
                                   init_lora_weights=False), "b")
    return model.to(DEVICE).eval()


def _alone(model: nn.Module, ids: torch.Tensor, names) -> torch.Tensor:
    """Each row's logits with its adapter alone (eager, single-adapter path)."""
    rows = []
    for b, name in enumerate(names):
        with torch.no_grad(), fp.batch_adapters(model, [name]):
            rows.append(model(input_ids=ids[b : b + 1]).logits)
    return torch.cat(rows)


def test_own_adapters_one_graph_matches_eager_for_any_mix(launches):
    model = _llama_two_adapters()
    ids = input_ids(batch=3, seq=5).to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    # The last mix uses no adapter of v_proj/down_proj ("b" does not target them).
    for names in (["a", None, "b"], ["b", "a", "a"], [None, "b", "b"]):
        with torch.no_grad(), fp.batch_adapters(model, names):
            if names[0] == "a":
                _no_breaks(model, input_ids=ids)
            launches.clear()
            got = compiled(input_ids=ids).logits
            assert launches, "the fused mixed-adapter kernel did not run"
            eager = model(input_ids=ids).logits
        assert rel_err(got, eager) < 1e-6
        if names[0] == "a":
            assert rel_err(got, _alone(model, ids, names)) < 1e-5
    assert counter.frame_count == 1  # the rows are data: a new mix of names reuses the graph


def test_own_adapters_compiled_sees_weights_edited_between_calls():
    """In-place edits under no_grad (what optimizers and load_state_dict do) and
    replaced tensors, between compiled calls: the graph reads the adapters each call."""
    model = _llama_two_adapters()
    ids = input_ids(batch=3, seq=4).to(DEVICE)
    names = ["a", "b", None]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), fp.batch_adapters(model, names):
        before = compiled(input_ids=ids).logits
        q_proj.adapters["a"].lora_B.mul_(3.0)
        model.model.layers[1].self_attn.o_proj.adapters["b"].lora_A.add_(0.5)
        after = compiled(input_ids=ids).logits
        eager = model(input_ids=ids).logits
        assert rel_err(after, eager) < 1e-6
        assert rel_err(after[0], before[0]) > 1e-3 and rel_err(after[1], before[1]) > 1e-3
        assert torch.equal(after[2], before[2])  # the base row did not change
        q_proj.adapters["b"].lora_A.data = torch.randn_like(q_proj.adapters["b"].lora_A)
        again = compiled(input_ids=ids).logits
        assert rel_err(again, model(input_ids=ids).logits) < 1e-6
        assert rel_err(again[1], after[1]) > 1e-3
    assert rel_err(again, _alone(model, ids, names)) < 1e-5


def _lora_params(model: nn.Module) -> list:
    """Every LoRA tensor of the model, all trainable (as after ``set_adapter``, for each)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _grads(out: torch.Tensor, g: torch.Tensor, inputs) -> list:
    """``d(out . g)/d inputs``, zeros for inputs ``out`` does not depend on."""
    found = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]


def test_own_adapters_compile_with_grad_enabled_forward_and_backward():
    """Eval mode without no_grad: the stacked adapters require grad, so AOT autograd
    traces the mixed op's backward at compile time. One graph, eager's outputs and
    eager's gradients (input embeddings and every adapter tensor)."""
    model = _llama_two_adapters()
    params = _lora_params(model)
    ids = input_ids(batch=3, seq=4).to(DEVICE)
    embeds = model.get_input_embeddings()(ids).detach()
    names = ["a", None, "b"]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for run in (compiled, model):
        x = embeds.clone().requires_grad_(True)
        with fp.batch_adapters(model, names):
            logits = run(inputs_embeds=x).logits
        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        results.append((logits, _grads(logits, g, [x, *params])))
    (got, got_grads), (eager, eager_grads) = results
    assert rel_err(got, eager) < 1e-6
    for out, ref in zip(got_grads, eager_grads):
        assert rel_err(out, ref) < 1e-5


def test_mixed_batch_gradients_equal_each_row_alone():
    """Eager: the gradients of a mixed batch w.r.t. the input embeddings and each
    adapter's tensors are the sums of each row's own, run with its adapter alone."""
    model = _llama_two_adapters()
    params = _lora_params(model)
    ids = input_ids(batch=3, seq=4).to(DEVICE)
    embeds = model.get_input_embeddings()(ids).detach()
    names = ["b", "a", None]
    g = torch.randn(3, 4, model.config.vocab_size, device=DEVICE)
    x = embeds.clone().requires_grad_(True)
    with fp.batch_adapters(model, names):
        got = _grads(model(inputs_embeds=x).logits, g, [x, *params])
    want = [torch.zeros_like(t) for t in got]
    for b, name in enumerate(names):
        xb = embeds[b : b + 1].clone().requires_grad_(True)
        with fp.batch_adapters(model, [name]):
            alone = _grads(model(inputs_embeds=xb).logits, g[b : b + 1], [xb, *params])
        want[0][b : b + 1] = alone[0]
        for total, d in zip(want[1:], alone[1:]):
            total += d
    for out, ref in zip(got, want):
        assert rel_err(out, ref) < 1e-5
    assert sum(bool(d.any()) for d in got[1:]) == len(params)  # every adapter tensor got a gradient


# ----------------------------------------------------------------------------- LoRA, pool


def _pool_weights(pool: AdapterPool, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(r, ls.in_features, generator=g) * 0.4, torch.randn(ls.out_features, r, generator=g) * 0.4)
            for name, ls in pool.layers.items()}


def test_pool_one_graph_matches_eager_and_follows_slot_changes(launches):
    """Pool adapters: no breaks, eager's numbers for any mix of names, and an adapter
    loaded into a freed slot between batches is served by the same graph."""
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), "own")
    model = model.to(DEVICE).eval()
    pool = AdapterPool(model, max_adapters=2, max_rank=4)
    pool.load("p", _pool_weights(pool, 2, seed=1), scaling=0.5)
    pool.load("q", _pool_weights(pool, 4, seed=2), scaling=2.0)
    ids = input_ids(batch=3, seq=5).to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad(), fp.batch_adapters(model, ["p", None, "q"]):
        _no_breaks(model, input_ids=ids)
    for names in (["p", None, "q"], ["q", "p", "p"], ["p", None, "q"]):
        with torch.no_grad(), fp.batch_adapters(model, names):
            launches.clear()
            got = compiled(input_ids=ids).logits
            assert launches, "the fused mixed-adapter kernel did not run"
            eager = model(input_ids=ids).logits
        assert rel_err(got, eager) < 1e-6
    assert rel_err(got, _alone(model, ids, names)) < 1e-5
    pool.unload("q")
    pool.load("r", _pool_weights(pool, 3, seed=3), scaling=1.5)  # q's slot, new contents
    with torch.no_grad(), fp.batch_adapters(model, ["r", "p", None]):
        got = compiled(input_ids=ids).logits
        assert rel_err(got, model(input_ids=ids).logits) < 1e-6
    assert rel_err(got, _alone(model, ids, ["r", "p", None])) < 1e-5
    assert counter.frame_count == 1


def test_pool_compiles_with_grad_enabled_forward_and_backward():
    """A pool's mixed batch, eval mode without no_grad, inputs that require grad (per-row
    saliency): compiles in one graph, eager's outputs and input gradients."""
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), "own")
    model = model.to(DEVICE).eval()
    pool = AdapterPool(model, max_adapters=2, max_rank=4)
    pool.load("p", _pool_weights(pool, 2, seed=1), scaling=0.5)
    pool.load("q", _pool_weights(pool, 4, seed=2), scaling=2.0)
    ids = input_ids(batch=3, seq=4).to(DEVICE)
    embeds = model.get_input_embeddings()(ids).detach()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for run in (compiled, model):
        x = embeds.clone().requires_grad_(True)
        with fp.batch_adapters(model, ["q", None, "p"]):
            logits = run(inputs_embeds=x).logits
        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        results.append((logits, _grads(logits, g, [x])[0]))
    (got, got_dx), (eager, eager_dx) = results
    assert rel_err(got, eager) < 1e-6
    assert rel_err(got_dx, eager_dx) < 1e-5


def test_pool_adapters_of_a_running_batch_stay_put():
    """The layers take a batch's slots when it starts: an adapter the batch uses cannot
    be unloaded (nor evicted) until the batch ends."""
    model = tiny_llama()
    fp.inject(model, fp.LoraConfig(r=2, target_modules=["q_proj"]), "own")
    pool = AdapterPool(model.eval(), max_adapters=1, max_rank=2)
    pool.load("p", _pool_weights(pool, 2, seed=1), scaling=1.0)
    with fp.batch_adapters(model, ["p", None]):
        with pytest.raises(RuntimeError, match="in use"):
            pool.unload("p")
        with pytest.raises(fp.PoolFullError):
            pool.load("q", _pool_weights(pool, 2, seed=2), scaling=1.0)
        assert pool.adapters == ["p"]
    pool.unload("p")
    assert pool.adapters == []


# ----------------------------------------------------------------------------- LoRA, layer level


def _lora_stack() -> nn.Module:
    first = FastLoRALinear.from_linear(nn.Linear(24, 20), r=4, lora_alpha=8, adapter_name="a",
                                       init_lora_weights=False)
    first.add_adapter("b", 7, 7, init_lora_weights=False, lora_bias=True)
    second = FastLoRALinear.from_linear(nn.Linear(20, 12), r=2, lora_alpha=2, adapter_name="b",
                                        init_lora_weights=False, lora_bias=True)
    return nn.Sequential(first, nn.GELU(), second).to(DEVICE).eval()


def _set_rows(model: nn.Module, names) -> None:
    for m in model.modules():
        if hasattr(m, "row_adapters"):
            m.row_adapters = names


def test_lora_bias_rows_and_adapters_added_during_a_batch_compiled():
    """lora_bias rows (a table gathered by the rows' slots, in the graph), and an adapter
    added while a batch runs: the compiled model follows eager."""
    model = _lora_stack()
    x = torch.randn(4, 3, 24, device=DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _set_rows(model, ["b", None, "a", "b"])
    with torch.no_grad():
        _no_breaks(model, x)
        assert rel_err(compiled(x), model(x)) < 1e-6
        model[2].adapters["b"].lora_bias.add_(1.0)
        assert rel_err(compiled(x), model(x)) < 1e-6
        model[2].add_adapter("a", 3, 6, init_lora_weights=False)  # "a" now targets both layers
        got = compiled(x)
        assert rel_err(got, model(x)) < 1e-6
    _set_rows(model, None)
    for b, name in enumerate(["b", None, "a", "b"]):
        for m in (model[0], model[2]):
            m.set_adapter(name)
        with torch.no_grad():
            assert rel_err(got[b], model(x[b : b + 1])[0]) < 1e-5


def test_inductor_compiles_a_mixed_batch():
    model = _lora_stack()
    x = torch.randn(3, 24, device=DEVICE)
    _set_rows(model, ["a", "b", None])
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
        model[0].adapters["a"].lora_A.mul_(-2.0)
        assert rel_err(compiled(x), model(x)) < 1e-5


# ----------------------------------------------------------------------------- (IA)^3, bottleneck


def _ia3_stack() -> nn.Module:
    first = IA3Linear.from_linear(nn.Linear(24, 20), adapter_name="a", init_ia3_weights=False)
    first.add_adapter("b", init_ia3_weights=False)
    second = IA3Linear.from_linear(nn.Linear(20, 12), is_feedforward=True, adapter_name="b", init_ia3_weights=False)
    return nn.Sequential(first, nn.GELU(), second).to(DEVICE).eval()


def _bottleneck_stack() -> nn.Module:
    first = BottleneckLinear.from_linear(nn.Linear(24, 20), bottleneck_size=6, adapter_name="a", init_weights=False)
    first.add_adapter("b", bottleneck_size=3, non_linearity="gelu", scaling=2.0, init_weights=False)
    second = BottleneckLinear.from_linear(nn.Linear(20, 12), bottleneck_size=4, adapter_name="b",
                                          non_linearity="silu", init_weights=False)
    return nn.Sequential(first, nn.GELU(), second).to(DEVICE).eval()


def _edit(model: nn.Module) -> None:
    """An optimizer-like in-place step on every adapter tensor and the base weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("build", [_ia3_stack, _bottleneck_stack], ids=["ia3", "bottleneck"])
def test_ia3_and_bottleneck_mixed_batches_compile(build):
    model = build()
    x = torch.randn(4, 3, 24, device=DEVICE)
    names = ["b", None, "a", "b"]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        _set_rows(model, names)
        _no_breaks(model, x)
        _set_rows(model, ["a", "b", "b", None])
        assert rel_err(compiled(x), model(x)) < 1e-6
        _set_rows(model, names)  # other rows, same sub-batch sizes: the rows are graph inputs
        eager = model(x)
        assert rel_err(compiled(x), eager) < 1e-6
        assert counter.frame_count == 1
        _edit(model)  # the bottleneck's W_eff is rebuilt from the new weights, in the graph
        got = compiled(x)
        assert rel_err(got, model(x)) < 1e-6 and rel_err(got, eager) > 1e-3
    _set_rows(model, None)
    for b, name in enumerate(names):
        for m in (model[0], model[2]):
            m.set_adapter(name if name in m.adapter_names else None)
        with torch.no_grad():
            assert rel_err(got[b], model(x[b : b + 1])[0]) < 1e-5
