"""AdaLoRA (fastpeft.methods.adalora) against the real ``peft`` package: config, init,
forward and gradients, checkpoints both ways (with a non-trivial ``rank_pattern``), the
orthogonal regulariser, rank allocation, merge/unload/switching, mixed batches, compile."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import fastpeft as fp
from fastpeft.methods.adalora.layer import AdaLoraLinear

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_llama  # noqa: E402

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
CFG = dict(init_r=4, target_r=2, total_step=20, tinit=3, tfinal=3, deltaT=2, target_modules=TARGETS, lora_alpha=8,
           task_type="CAUSAL_LM")  # PEFT adds the regulariser in its task models (PeftModelForCausalLM)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)}


def _peft_model(seed: int = 3, **overrides):
    """A trainable PEFT AdaLoRA model with non-zero E (A, B are PEFT's N(0, 0.02))."""
    pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**{**CFG, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


def _peft_tensors(pm, kind: str):
    """``{module path: tensor}`` of PEFT's ``lora_A/E/B`` for the default adapter."""
    out = {}
    for n, p in pm.base_model.model.named_parameters():
        if f".{kind}.default" in n:
            out[n[: -len(f".{kind}.default")]] = p
    return out


# ------------------------------------------------------------------ config, init, forward


def test_config_has_peft_fields_and_defaults():
    ours = fp.AdaLoraConfig(total_step=10)
    theirs = peft.AdaLoraConfig(total_step=10)
    for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "rank_pattern", "lora_alpha", "lora_dropout", "r", "init_lora_weights"):
        assert getattr(ours, key) == getattr(theirs, key), key
    with pytest.raises(ValueError, match="total_step"):
        fp.AdaLoraConfig()
    with pytest.raises(ValueError, match="budgeting phase"):
        fp.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="list of booleans"):
        fp.AdaLoraConfig(total_step=10, rank_pattern={"q_proj": 4})


def test_inject_init_matches_peft_and_is_a_no_op():
    model = tiny_llama()
    ids = input_ids()
    base = logits(model, ids)
    fp.inject(model, peft.AdaLoraConfig(**CFG))  # a peft config object works too
    layers = _layers(model)
    assert sorted(layers) == sorted(n for n, _ in tiny_llama().named_modules() if n.endswith(tuple(TARGETS)))
    for layer in layers.values():
        a = layer.adapters["default"]
        assert a.lora_A.shape == (4, 32) and a.lora_E.shape == (4, 1) and a.lora_B.shape[1] == 4
        assert torch.count_nonzero(a.lora_E) == 0
        assert a.ranknum == 4.0 and a.scaling == 8
    # E = 0: the update is zero, so the outputs are the base model's up to the fused
    # kernel's own summation order (its GEMM is not the BLAS that ran the base).
    torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1] in ("lora_A", "lora_E", "lora_B") for n in trainable)


def test_forward_and_grads_match_the_unfused_form():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    layer = AdaLoraLinear.wrap(lin, r=5, lora_alpha=6, init_lora_weights=False, ranknum=5.0).train()
    a = layer.adapters["default"]
    x = torch.randn(3, 7, 24, requires_grad=True)
    y = layer(x)
    ref = lin(x) + (x @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * 6 / (5.0 + 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a.lora_A, a.lora_E, a.lora_B), g)
    refs = torch.autograd.grad(ref, (x, a.lora_A, a.lora_E, a.lora_B), g)
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ checkpoints


def _rank_pattern(pm):
    """A non-trivial pattern (ranks 4, 2, 1, 0 over the layers), applied to PEFT's E as
    training would, and set on its config with PEFT's training-time keys."""
    keep = [[True] * 4, [True, False, True, False], [False, False, False, True], [False] * 4]
    pattern = {}
    with torch.no_grad():
        for (path, E), mask in zip(sorted(_peft_tensors(pm, "lora_E").items()), keep):
            E.mul_(torch.tensor(mask, dtype=E.dtype).unsqueeze(-1))
            pattern[f"{path}.lora_E.default"] = mask
    pm.peft_config["default"].rank_pattern = pattern
    return pattern


def test_peft_checkpoint_with_rank_pattern_loads_with_peft_logits(tmp_path):
    pm = _peft_model()
    _rank_pattern(pm)
    pm.save_pretrained(tmp_path)
    ids = input_ids()
    want = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), ids)
    torch.testing.assert_close(logits(pm.eval(), ids), want, rtol=1e-5, atol=1e-5)
    model = fp.load_adapter(tiny_llama(), tmp_path)
    ranks = sorted(layer.adapters["default"].r for layer in _layers(model).values())
    assert ranks == [0, 1, 2, 4]
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_fastpeft_save_loads_in_peft_with_the_same_logits(tmp_path):
    model = tiny_llama()
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False))
    config = model.fastpeft_config["default"]
    paths = sorted(_layers(model))
    masks = [[True, False, True, True], [False] * 4, [True] * 4, [False, True, False, False]]
    config.rank_pattern = {f"{p}.lora_E": m for p, m in zip(paths, masks)}
    with torch.no_grad():  # as the allocator leaves a model: the dropped triplets' E are 0
        for p, m in zip(paths, masks):
            _layers(model)[p].adapters["default"].lora_E.mul_(torch.tensor(m, dtype=torch.float32).unsqueeze(-1))
    ids = input_ids()
    ours = logits(model.eval(), ids)
    fp.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"] == config.rank_pattern
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(pm, ids), ours, rtol=1e-5, atol=1e-5)
    again = fp.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(again, ids), ours, rtol=1e-5, atol=1e-5)


def test_legacy_ranknum_keys_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = _peft_model()
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith(".lora_A")]:
        tensors[key[: -len("lora_A")] + "ranknum"] = torch.tensor([4.0])
    save_file(tensors, file)
    ids = input_ids()
    torch.testing.assert_close(logits(fp.load_adapter(tiny_llama(), tmp_path), ids), logits(pm.eval(), ids),
                               rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_clear_errors_and_change_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = _peft_model()
    pm.save_pretrained(tmp_path / "e")
    file = tmp_path / "e" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith(".lora_E"))
    tensors[key] = torch.zeros(4, 2)
    save_file(tensors, file)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lora_E .* do not fit together"):
        fp.load_adapter(model, tmp_path / "e")
    assert_same_snapshot(before, snapshot(model))

    pm.save_pretrained(tmp_path / "p")
    cfg_file = tmp_path / "p" / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["rank_pattern"] = {"model.layers.7.self_attn.q_proj.lora_E": [True, True, False, False]}
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rank_pattern names .*layers.7"):
        fp.load_adapter(model, tmp_path / "p")
    assert_same_snapshot(before, snapshot(model))


# ------------------------------------------------------------------ training


def _pair(tmp_path):
    """A trainable PEFT model and a fastpeft model with the same weights (through PEFT's
    checkpoint), both in train mode."""
    pm = _peft_model()
    pm.save_pretrained(tmp_path)
    model = fp.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    return pm.train(), model.train()


def test_training_step_loss_and_grads_match_peft(tmp_path):
    pm, model = _pair(tmp_path)
    ids = input_ids()
    want = pm(input_ids=ids, labels=ids).loss
    got = model(input_ids=ids, labels=ids).loss
    plain = tiny_llama().train()
    base_loss = plain(input_ids=ids, labels=ids).loss  # E != 0, so the adapter matters too
    reg = fp.orthogonal_regularization(model)
    assert reg.item() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, base_loss + reg)
    want.backward()
    got.backward()
    layers = _layers(model)
    for kind in ("lora_A", "lora_E", "lora_B"):
        for path, p in _peft_tensors(pm, kind).items():
            mine = getattr(layers[path].adapters["default"], kind)
            torch.testing.assert_close(mine.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_update_and_allocate_matches_peft(tmp_path):
    pm, model = _pair(tmp_path)
    layers = _layers(model)
    g = torch.Generator().manual_seed(11)
    alloc_budgets = []
    for step in range(1, 21):
        with torch.no_grad():
            for kind in ("lora_A", "lora_E", "lora_B"):
                for path, p in sorted(_peft_tensors(pm, kind).items()):
                    mine = getattr(layers[path].adapters["default"], kind)
                    grad = torch.randn(p.shape, generator=g)
                    p.grad, mine.grad = grad.clone(), grad.clone()
                    p.sub_(0.01 * grad)  # an optimizer step, the same on both sides
                    mine.sub_(0.01 * grad)
        pm.base_model.update_and_allocate(step)
        budget = fp.update_and_allocate(model, step)
        if step <= CFG["total_step"] - CFG["tfinal"]:
            assert budget == pm.base_model.rankallocator.budget_schedule(step)[0], step
            alloc_budgets.append(budget)
        for path, E in _peft_tensors(pm, "lora_E").items():
            assert torch.equal(layers[path].adapters["default"].lora_E, E), (step, path)
    assert alloc_budgets[0] == 16 and alloc_budgets[-1] == 8 and len(set(alloc_budgets)) > 3
    theirs = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert model.fastpeft_config["default"].rank_pattern == theirs
    assert sum(sum(m) for m in theirs.values()) == 8
    # and the result saves as PEFT saves it
    fp.save_adapter(model, tmp_path / "out")
    ids = input_ids()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model.eval(), ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ state, mixed batches, compile


def test_merge_unmerge_unload_switch_delete():
    model = tiny_llama()
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False), "a")
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False), "b")
    ids = input_ids()
    out_a = logits(model, ids)
    fp.set_adapter(model, "b")
    out_b = logits(model, ids)
    assert not torch.allclose(out_a, out_b)
    fp.merge(model)
    torch.testing.assert_close(logits(model, ids), out_b, rtol=1e-4, atol=1e-4)
    fp.unmerge(model)
    torch.testing.assert_close(logits(model, ids), out_b, rtol=1e-5, atol=1e-5)
    fp.delete_adapter(model, "b")
    assert fp.adapter_names(model) == ["a"]
    fp.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, ids), out_a, rtol=1e-5, atol=1e-5)
    plain = fp.unload(model)
    assert not _layers(plain)
    torch.testing.assert_close(logits(plain, ids), out_a, rtol=1e-4, atol=1e-4)


def test_mixed_batch_rows_match_single_adapter_runs():
    model = tiny_llama()
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False), "a")
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False), "b")
    ids = input_ids(batch=3)
    single = {}
    for name in ("a", "b"):
        fp.set_adapter(model, name)
        single[name] = logits(model, ids)
    fp.set_adapter(model, None)
    single[None] = logits(model, ids)
    rows = ["a", None, "b"]
    with fp.batch_adapters(model, rows):
        mixed = logits(model, ids)  # one fused mixed-LoRA launch per layer
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i], rtol=1e-5, atol=1e-5)


def test_mixed_batch_with_pruned_adapters(tmp_path):
    """A loaded adapter with ranks 4, 2, 1, 0 (a rank_pattern) beside a full one."""
    pm = _peft_model()
    _rank_pattern(pm)
    pm.save_pretrained(tmp_path)
    model = fp.load_adapter(tiny_llama(), tmp_path, "pruned")
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False), "full")
    ids = input_ids(batch=3)
    single = {}
    for name in ("pruned", "full"):
        fp.set_adapter(model, name)
        single[name] = logits(model.eval(), ids)
    rows = ["full", "pruned", "pruned"]
    with fp.batch_adapters(model, rows):
        mixed = logits(model, ids)
        out = model(input_ids=ids).logits  # with autograd: gradients reach each row's adapter
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i], rtol=1e-5, atol=1e-5)
    out[0].sum().backward()  # row 0 uses "full" only
    layer = _layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["full"].lora_B.grad is not None and layer.adapters["full"].lora_B.grad.abs().sum() > 0
    pruned_grad = layer.adapters["pruned"].lora_B.grad
    assert pruned_grad is None or pruned_grad.abs().sum() == 0


def test_compile_has_no_graph_breaks():
    torch.manual_seed(0)
    model = nn.Sequential(
        AdaLoraLinear.wrap(nn.Linear(24, 32), r=4, lora_alpha=8, init_lora_weights=False),
        nn.GELU(),
        AdaLoraLinear.wrap(nn.Linear(32, 16), r=3, lora_alpha=8, init_lora_weights=False),
    ).train()
    explanation = torch._dynamo.explain(model)(torch.randn(5, 24))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


# ------------------------------------------------------------------ benchmark


def test_benchmark_cpu_pass_and_points_check_every_variant(monkeypatch, tmp_path):
    import importlib
    import pathlib

    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "bench_ms", lambda fn, **kw: (fn(), 1.0)[1])
    bench_adalora = importlib.import_module("bench_adalora")
    assert bench_adalora.main(["--json", str(tmp_path / "a.json")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["mode"] == "cpu-correctness" and all(r["rel_err"] <= r["tol"] for r in data["results"])
    for point in (bench_adalora._time_point, bench_adalora._time_train_point):
        row = point(40, 24, 5, 4, dev="cpu", dt=torch.float32)
        for name in ("unfused", "peft", "fastpeft"):
            assert row[f"{name}_err"] < 1e-5, row
            assert row[f"{name}_x"] == 1.0


def test_compiled_forward_and_backward_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = AdaLoraLinear.wrap(nn.Linear(24, 16), r=4, lora_alpha=8, init_lora_weights=False).train()
    a = layer.adapters["default"]
    x = torch.randn(6, 24)
    eager = layer(x)
    grads = torch.autograd.grad(eager.square().sum(), [a.lora_A, a.lora_E, a.lora_B])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    cgrads = torch.autograd.grad(compiled.square().sum(), [a.lora_A, a.lora_E, a.lora_B])
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(cgrads, grads):
        torch.testing.assert_close(got, want)


def test_default_targets_loss_hook_scope_and_unload(tmp_path):
    model = tiny_llama()
    fp.inject(model, fp.AdaLoraConfig(total_step=10))  # PEFT's AdaLoRA defaults for llama
    assert sorted({n.rsplit(".", 1)[-1] for n in _layers(model)}) == ["q_proj", "v_proj"]
    ids = input_ids()
    plain = tiny_llama()
    reg = fp.orthogonal_regularization(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss + reg)
    fp.save_adapter(model, tmp_path)
    frozen = fp.load_adapter(tiny_llama(), tmp_path)  # inference_mode: PEFT trains nothing, adds nothing
    torch.testing.assert_close(frozen(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss)
    fp.unload(model)
    assert not model._forward_hooks and "fastpeft_loss_hook" not in model.__dict__


def test_whole_model_compiles_in_one_graph_with_the_regulariser():
    """fullgraph=True: the model's forward, the AdaLoRA layers and the loss hook that adds
    the orthogonal term trace without a graph break (``explain`` counts a forward hook's
    frame as a second graph even for a trivial hook, so fullgraph is the check here)."""
    torch._dynamo.reset()
    model = tiny_llama()
    fp.inject(model, fp.AdaLoraConfig(**CFG, init_lora_weights=False))
    model.train()
    ids = input_ids()
    eager = model(input_ids=ids, labels=ids).loss
    compiled = torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(compiled, eager)


def test_rank_pattern_spellings_and_bad_masks():
    path = "model.layers.0.self_attn.q_proj"
    model = tiny_llama()
    pattern = {f"{path}.lora_E.trained_as": [True, False, True, False]}  # PEFT's training-time key
    fp.inject(model, fp.AdaLoraConfig(**CFG, rank_pattern=pattern), "x")
    layers = _layers(model)
    assert layers[path].adapters["x"].r == 2 and layers[path].adapters["x"].ranknum == 4.0
    assert layers["model.layers.0.self_attn.v_proj"].adapters["x"].r == 4
    fresh = tiny_llama()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="3 entries but init_r is 4"):
        fp.inject(fresh, fp.AdaLoraConfig(**CFG, rank_pattern={f"{path}.lora_E": [True] * 3}))
    with pytest.raises(ValueError, match="adapt no module"):
        fp.inject(fresh, fp.AdaLoraConfig(**CFG, rank_pattern={"lm_head.lora_E": [True] * 4}))
    assert_same_snapshot(before, snapshot(fresh))


# ------------------------------------------------------------------ serving from the pool


def _pool_setup(tmp_path):
    """A pruned PEFT AdaLoRA adapter (ranks 4, 2, 1, 0) and a PEFT LoRA adapter, saved;
    a pool over a tiny Llama with LoRA layers on the same targets."""
    from fastpeft.serving.pool import AdapterPool

    ada = _peft_model()
    _rank_pattern(ada)
    ada.save_pretrained(tmp_path / "ada")
    torch.manual_seed(5)
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS,
                                                             init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    model = fp.inject(tiny_llama(), fp.LoraConfig(r=4, target_modules=TARGETS)).eval()  # own adapter: B = 0
    pool = AdapterPool(model, max_adapters=3, max_rank=4)
    pool.load("ada", str(tmp_path / "ada"))
    pool.load("lora", str(tmp_path / "lora"))
    refs = {"ada": peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ada").eval(),
            "lora": lora.eval(), None: tiny_llama()}
    return model, pool, refs, ada


def test_pool_serves_peft_adalora_in_mixed_batches_and_generation(tmp_path):
    from fastpeft.serving.engine import ServingEngine

    model, pool, refs, _ = _pool_setup(tmp_path)
    # Each layer: its current rank (the pruned layer: none), A ∘ E, and the AdaLoRA layer's own scale.
    loaded = _layers(fp.load_adapter(tiny_llama(), tmp_path / "ada"))
    slot = pool.slot_of("ada")
    assert sorted(int(ls.ranks[slot]) for ls in pool.layers.values()) == [0, 1, 2, 4]
    for path, layer in loaded.items():
        a, ls = layer.adapters["default"], pool.layers[path]
        assert int(ls.ranks[slot]) == a.r
        assert float(ls.scalings[slot]) == (float(torch.tensor(a.scale)) if a.r else 0.0)  # rank 0: no adapter
        assert torch.equal(ls.lora_A[slot, : a.r], a.lora_A * a.lora_E)
        assert torch.equal(ls.lora_B[slot, :, : a.r], a.lora_B)
    ids = input_ids(batch=4)
    rows = ["ada", "lora", None, "ada"]
    with fp.batch_adapters(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], logits(refs[name], ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2])  # the adapter changes the output: the test is not vacuous
    prompts, names = [[5, 17, 3, 9], [42, 7], [11, 12, 13, 14, 15]], ["lora", "ada", None]
    out = ServingEngine(model, pool, eos_token_id=None).generate(prompts, names, max_new_tokens=5)
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        seq = torch.tensor([prompt])
        for _ in range(5):
            seq = torch.cat([seq, logits(refs[name], seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.new_tokens[row].tolist() == seq[0, -5:].tolist()


def test_pool_loads_an_adalora_state_dict_with_its_config(tmp_path):
    model, pool, _, ada = _pool_setup(tmp_path)
    tensors = peft.get_peft_model_state_dict(ada)  # pruned to the rank_pattern, as PEFT saves
    pool.load("mem", tensors, config=ada.peft_config["default"])
    a, m = pool.slot_of("ada"), pool.slot_of("mem")
    for ls in pool.layers.values():
        assert int(ls.ranks[a]) == int(ls.ranks[m]) and float(ls.scalings[a]) == float(ls.scalings[m])
        assert torch.equal(ls.lora_A[a], ls.lora_A[m]) and torch.equal(ls.lora_B[a], ls.lora_B[m])


def _pool_state(pool):
    return ({n: [t.clone() for t in (ls.lora_A, ls.lora_B, ls.ranks, ls.scalings)] for n, ls in pool.layers.items()},
            dict(pool._slot_of), pool.adapters)


@pytest.mark.parametrize("case", ["E_shape_dir", "E_shape_state_dict", "no_config", "pattern_absent",
                                  "lora_alpha_given", "nan_E", "rank_vs_config"])
def test_pool_refuses_bad_adalora_adapters_unchanged(tmp_path, case):
    from fastpeft.serving.pool import AdapterError

    model, pool, _, ada = _pool_setup(tmp_path)
    pool.load("extra", peft.get_peft_model_state_dict(ada), config=ada.peft_config["default"])  # full: no eviction
    before = _pool_state(pool)
    tensors = dict(peft.get_peft_model_state_dict(ada))
    config = ada.peft_config["default"].to_dict()
    e_key = next(k for k in sorted(tensors) if k.endswith(".lora_E") and tensors[k].shape[0] > 0)
    kwargs = {"config": config}
    if case == "E_shape_dir":
        from safetensors.torch import load_file, save_file

        file = tmp_path / "ada" / "adapter_model.safetensors"
        saved = load_file(file)
        saved[e_key] = torch.zeros(saved[e_key].shape[0], 2)
        save_file(saved, file)
        source, kwargs, what = str(tmp_path / "ada"), {}, r"lora_E has shape \(\d, 2\) but lora_A has rank"
    else:
        source = tensors
    if case == "E_shape_state_dict":
        tensors[e_key] = tensors[e_key].reshape(1, -1)
        what = r"lora_E has shape \(1, \d\) but lora_A has rank"
    elif case == "no_config":
        kwargs, what = {}, r"an AdaLoRA adapter \(its tensors include .*give its AdaLoRA config"
    elif case == "pattern_absent":
        config["rank_pattern"] = {**config["rank_pattern"], "model.layers.7.self_attn.q_proj.lora_E": [True] * 4}
        what = r"rank_pattern names 'model.layers.7.*no weights for it"
    elif case == "lora_alpha_given":
        kwargs["lora_alpha"] = 8
        what = "its config fixes each layer's scale"
    elif case == "nan_E":
        tensors[e_key] = tensors[e_key].clone()
        tensors[e_key][0, 0] = float("nan")
        what = "lora_E holds NaN or inf"
    elif case == "rank_vs_config":
        config["rank_pattern"] = None
        what = r"the tensors have rank \d but the config gives this layer rank 4"
    with pytest.raises(AdapterError, match=what):
        pool.load("bad", source, **kwargs)
    after = _pool_state(pool)
    assert after[1:] == before[1:]
    for n, ts in before[0].items():
        assert all(torch.equal(x, y) for x, y in zip(ts, after[0][n])), n
