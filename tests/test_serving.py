"""AdapterPool (fixed slots, LRU, pinning, validation) and ServingEngine (batched
multi-adapter generation) on a tiny random Llama; nothing is downloaded."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE
from numerics import rel_err

import fastpeft as fp
import fastpeft.methods.lora.multi_op as ops_multi
from fastpeft.kernels.reference import lora_linear_ref
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.serving.engine import ServingEngine
from fastpeft.serving.pool import AdapterError, AdapterPool, PoolFullError

transformers = pytest.importorskip("transformers")

TARGETS = ("q_proj", "v_proj", "down_proj")
PROMPTS = [[5, 17, 3, 9], [42, 7], [11, 12, 13, 14, 15, 16], [8, 1, 30]]


def _base_model():
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


def _inject(model):
    """FastLoRALinear on every TARGETS linear (its own adapter is a no-op: B = 0)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                setattr(mod, child_name, FastLoRALinear.from_linear(child, r=2, lora_alpha=2))
    return model.eval()


@pytest.fixture
def model():
    return _inject(_base_model())



def _weights(pool, r, seed, layers=None, scale=0.4):
    """In-memory adapter ``{layer: (A, B)}`` of rank r (on a subset of layers if given)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, ls in pool.layers.items():
        if layers is None or name in layers:
            out[name] = (torch.randn(r, ls.in_features, generator=g) * scale,
                         torch.randn(ls.out_features, r, generator=g) * scale)
    return out


def _snapshot(pool):
    state = {n: (ls.lora_A.clone(), ls.lora_B.clone(), ls.ranks.clone(), ls.scalings.clone())
             for n, ls in pool.layers.items()}
    return state, dict(pool._slot_of), list(pool.adapters), set(pool._pinned)


def _assert_same(pool, snap):
    state, slots, order, pinned = snap
    assert dict(pool._slot_of) == slots and pool.adapters == order and set(pool._pinned) == pinned
    for n, ls in pool.layers.items():
        A, B, r, s = state[n]
        assert torch.equal(ls.lora_A, A) and torch.equal(ls.lora_B, B)
        assert torch.equal(ls.ranks, r) and torch.equal(ls.scalings, s)


def _layer_check(model, layer_name, layer, adapters, names, x):
    """The layer's mixed forward through the pool vs each row's adapter alone (float64)."""
    with torch.no_grad(), fp.batch_adapters(model, names):
        y = layer(x)
    assert layer.row_adapters is None
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    ref = []
    for b, n in enumerate(names):
        xb = x[b : b + 1].double()
        if n is None or layer_name not in adapters[n][0]:
            ref.append(F.linear(xb, d(layer.weight), d(layer.bias)))
        else:
            A, B = adapters[n][0][layer_name]
            ref.append(lora_linear_ref(xb, d(layer.weight), d(layer.bias), A.double().to(DEVICE),
                                       B.double().to(DEVICE), adapters[n][1] / A.shape[0]))
    return rel_err(y, torch.cat(ref))


# ----------------------------------------------------------------------------- the pool


def test_pool_slots_are_fixed_and_loads_write_in_place(model, launches):
    pool = AdapterPool(model, max_adapters=3, max_rank=16)
    assert len(pool.layers) == 2 * len(TARGETS)
    ls = pool.layers["model.layers.0.self_attn.q_proj"]
    assert ls.lora_A.shape == (3, 16, 32) and ls.lora_B.shape == (3, 32, 16)
    ptrs = {n: (s.lora_A.data_ptr(), s.lora_B.data_ptr(), s.ranks.data_ptr()) for n, s in pool.layers.items()}
    adapters = {"a": (_weights(pool, 4, 1), 8.0), "b": (_weights(pool, 16, 2), 4.0),
                "c": (_weights(pool, 1, 3, layers={"model.layers.1.mlp.down_proj"}), 2.0)}
    for n, (w, alpha) in adapters.items():
        pool.load(n, w, lora_alpha=alpha)
    assert sorted(pool.adapters) == ["a", "b", "c"] and len(pool) == 3
    assert ls.ranks.tolist() == [4, 16, 0]  # "c" does not target q_proj: rank 0 there
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        x = torch.randn(5, 3, layer.in_features, device=DEVICE)
        assert _layer_check(model, name, layer, adapters, ["c", "a", None, "b", "a"], x) < 1e-5
    assert launches
    pool.unload("b")
    pool.load("b2", _weights(pool, 7, 9), lora_alpha=7.0)
    assert pool.slot_of("b2") == 1
    assert ptrs == {n: (s.lora_A.data_ptr(), s.lora_B.data_ptr(), s.ranks.data_ptr()) for n, s in pool.layers.items()}
    assert ls.lora_A.shape == (3, 16, 32)


def test_lru_eviction_and_pinning(model):
    pool = AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("a", _weights(pool, 4, 1), lora_alpha=4)
    pool.load("b", _weights(pool, 4, 2), lora_alpha=4)
    pool.touch(["a"])  # a used last: b is the least recently used
    pool.load("c", _weights(pool, 4, 3), lora_alpha=4)
    assert "b" not in pool and set(pool.adapters) == {"a", "c"}
    pool.row_slots(["c"])  # using an adapter also refreshes it
    pool.pin("a")
    pool.load("d", _weights(pool, 4, 4), lora_alpha=4)  # a pinned: c goes though more recent
    assert set(pool.adapters) == {"a", "d"} and pool.is_pinned("a")
    pool.pin("d")
    snap = _snapshot(pool)
    with pytest.raises(PoolFullError, match="pinned or in-use"):
        pool.load("e", _weights(pool, 4, 5), lora_alpha=4)
    _assert_same(pool, snap)
    pool.unpin("d")
    with pool.in_use(["d"]):  # adapters of a running batch are not evicted either
        with pytest.raises(PoolFullError):
            pool.load("e", _weights(pool, 4, 5), lora_alpha=4)
        with pytest.raises(RuntimeError, match="in use"):
            pool.unload("d")
    pool.load("e", _weights(pool, 4, 5), lora_alpha=4)
    assert set(pool.adapters) == {"a", "e"}
    pool.unload("a")  # pinned adapters can still be unloaded explicitly
    assert pool.adapters == ["e"]


def test_load_evict_reload_cycles_keep_results_right(model):
    pool = AdapterPool(model, max_adapters=3, max_rank=16)
    name = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(name)
    rng = random.Random(0)
    adapters = {f"ad{i}": (_weights(pool, r, 10 + i), float(2 * r)) for i, r in enumerate([1, 5, 16, 9, 3])}
    x = torch.randn(6, 2, layer.in_features, device=DEVICE)
    for step in range(12):
        n = rng.choice(sorted(adapters))
        if n not in pool:
            pool.load(n, adapters[n][0], lora_alpha=adapters[n][1])
        if step % 4 == 3:
            pool.unload(rng.choice(pool.adapters))
        loaded = pool.adapters
        names = [rng.choice(loaded + [None]) if loaded else None for _ in range(6)]
        assert _layer_check(model, name, layer, adapters, names, x) < 1e-5, (step, names)


def _peft_dir(tmp_path, base, name, r, alpha, seed, **extra):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra),
    )
    path = tmp_path / name
    pm.save_pretrained(str(path))
    return str(path), pm.eval()


def test_peft_directories_match_peft_logits(tmp_path, launches):
    """Adapters saved by HF PEFT, served together: each row's logits equal PEFT's own
    model with that adapter (rank_pattern / alpha_pattern / rsLoRA included)."""
    base = _base_model()
    p1, pm1 = _peft_dir(tmp_path, base, "one", 8, 16, 1, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 4})
    p2, pm2 = _peft_dir(tmp_path, base, "two", 3, 5, 2, use_rslora=True)
    model = _inject(copy.deepcopy(base))
    pool = AdapterPool(model, max_adapters=4, max_rank=8)
    pool.load("one", p1)
    pool.load("two", p2)
    ids = torch.tensor([PROMPTS[0], PROMPTS[3][:3] + [4], PROMPTS[2][:4]], device=DEVICE)
    names = ["two", None, "one"]
    with torch.no_grad():
        with fp.batch_adapters(model, names):
            logits = model(ids).logits
        ref = torch.cat([
            pm2(ids[0:1]).logits, base(ids[1:2]).logits, pm1(ids[2:3]).logits,
        ])
    assert launches
    assert rel_err(logits, ref) < 1e-5


@pytest.mark.parametrize(
    "case",
    ["in_features", "out_features", "rank_too_big", "nan", "missing_B", "unknown_layer", "duplicate_name",
     "no_alpha", "lora_bias_key", "dora_config", "config_rank_mismatch", "empty", "not_tensor", "missing_dir"],
)
def test_bad_adapter_raises_and_leaves_pool_unchanged(model, case, tmp_path):
    pool = AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("a", _weights(pool, 4, 1), lora_alpha=4)
    pool.load("b", _weights(pool, 4, 2), lora_alpha=4)  # full: a bad load must not evict
    snap = _snapshot(pool)
    q = "model.layers.0.self_attn.q_proj"
    w = _weights(pool, 4, 3)
    kwargs = {"lora_alpha": 4}
    name = "new"
    if case == "in_features":
        w[q] = (torch.randn(4, 31), w[q][1])
    elif case == "out_features":
        w[q] = (w[q][0], torch.randn(33, 4))
    elif case == "rank_too_big":
        w[q] = (torch.randn(9, 32), torch.randn(32, 9))
    elif case == "nan":
        w[q][1][0, 0] = float("nan")
    elif case == "missing_B":
        w = {f"base_model.model.{q}.lora_A.weight": w[q][0]}
    elif case == "unknown_layer":
        w["model.layers.7.self_attn.q_proj"] = w[q]
    elif case == "duplicate_name":
        name = "a"
    elif case == "no_alpha":
        kwargs = {}
    elif case == "lora_bias_key":
        w = {f"base_model.model.{q}.lora_A.weight": w[q][0], f"base_model.model.{q}.lora_B.weight": w[q][1],
             f"base_model.model.{q}.lora_B.bias": torch.zeros(32)}
    elif case == "dora_config":
        w = {f"base_model.model.{q}.lora_A.weight": w[q][0], f"base_model.model.{q}.lora_B.weight": w[q][1]}
        kwargs = {"config": {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "use_dora": True}}
    elif case == "config_rank_mismatch":
        w = {f"base_model.model.{q}.lora_A.weight": w[q][0], f"base_model.model.{q}.lora_B.weight": w[q][1]}
        kwargs = {"config": {"r": 8, "lora_alpha": 4}}
    elif case == "empty":
        w = {}
    elif case == "not_tensor":
        w[q] = (w[q][0].tolist(), w[q][1])
    elif case == "missing_dir":
        w = str(tmp_path / "nope")
    with pytest.raises(AdapterError) as err:
        pool.load(name, w, **kwargs)
    assert str(err.value)  # a message that names the problem
    _assert_same(pool, snap)


def test_pool_from_shapes_drives_the_op_directly():
    pool = AdapterPool({"proj": (24, 20)}, max_adapters=4, max_rank=8, device=DEVICE, dtype=torch.float32)
    pool.load("x", {"proj": (torch.randn(3, 24), torch.randn(20, 3))}, scaling=0.5)
    pool.load("y", {"proj": (torch.randn(8, 24), torch.randn(20, 8))}, scaling={"proj": 2.0})
    ls = pool.layers["proj"]
    x = torch.randn(4, 24, device=DEVICE)
    w = torch.randn(20, 24, device=DEVICE)
    meta = pool.meta_for(["y", None, "x", "y"], x)
    y = ops_multi.multi_lora_linear(x, w, None, ls.lora_A, ls.lora_B, ls.ranks, ls.scalings, meta)
    ref = ops_multi.multi_lora_linear(x.double(), w.double(), None, ls.lora_A.double(), ls.lora_B.double(),
                                      ls.ranks, ls.scalings, meta, backend="torch")
    assert rel_err(y, ref) < 1e-6
    with pytest.raises(KeyError, match="not loaded"):
        pool.row_slots(["x", "nope"])


# ----------------------------------------------------------------------------- generation


def _pool_with_three(model):
    pool = AdapterPool(model, max_adapters=4, max_rank=16)
    pool.load("a", _weights(pool, 4, 1, scale=0.6), lora_alpha=8)
    pool.load("b", _weights(pool, 16, 2, scale=0.6), lora_alpha=16)
    pool.load("c", _weights(pool, 1, 3, scale=0.6, layers={n for n in pool.layers if "layers.1" in n}), lora_alpha=1)
    return pool


def test_generate_batch_equals_each_alone_greedy(model, launches):
    pool = _pool_with_three(model)
    engine = ServingEngine(model, pool, eos_token_id=None)
    names = ["a", "b", None, "c"]
    out = engine.generate(PROMPTS, names, max_new_tokens=6)
    assert launches, "the fused mixed-adapter kernel did not run"
    assert out.new_tokens.shape == (4, 6) and out.prompt_lengths == [4, 2, 6, 3]
    alone = [engine.generate([p], [n], max_new_tokens=6).new_tokens[0] for p, n in zip(PROMPTS, names)]
    assert torch.equal(out.new_tokens, torch.stack(alone))
    # the adapters change the output (the test is not vacuous) ...
    assert len({tuple(t.tolist()) for t in engine.generate([PROMPTS[0]] * 4, names, 6).new_tokens}) > 1
    # ... and the base row equals the plain model, no adapters anywhere (greedy, no cache)
    ids = torch.tensor([PROMPTS[2]], device=DEVICE)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.new_tokens[2], ids[0, -6:])


def test_generate_matches_peft_greedy(tmp_path):
    base = _base_model()
    p1, pm1 = _peft_dir(tmp_path, base, "one", 8, 16, 11)
    p2, pm2 = _peft_dir(tmp_path, base, "two", 2, 4, 12)
    model = _inject(copy.deepcopy(base))
    pool = AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("one", p1)
    pool.load("two", p2)
    out = ServingEngine(model, pool, eos_token_id=None).generate(PROMPTS[:2], ["two", "one"], max_new_tokens=5)
    for row, (prompt, pm) in enumerate(zip(PROMPTS[:2], (pm2, pm1))):
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, pm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.new_tokens[row].tolist() == ids[0, -5:].tolist()


def test_seeded_sampling_reproducible_and_batch_independent(model):
    pool = _pool_with_three(model)
    engine = ServingEngine(model, pool, eos_token_id=None)
    names = ["b", "a", None]
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=7)
    first = engine.generate(PROMPTS[:3], names, **kw).new_tokens
    again = engine.generate(PROMPTS[:3], names, **kw).new_tokens
    assert torch.equal(first, again)
    alone = torch.stack([engine.generate([p], [n], **kw).new_tokens[0] for p, n in zip(PROMPTS[:3], names)])
    assert torch.equal(first, alone)
    other = engine.generate(PROMPTS[:3], names, **{**kw, "seed": [8, 9, 10]}).new_tokens
    assert not torch.equal(first, other)
    greedy = engine.generate(PROMPTS[:3], names, max_new_tokens=6).new_tokens
    top1 = engine.generate(PROMPTS[:3], names, max_new_tokens=6, do_sample=True, top_k=1, seed=3).new_tokens
    assert torch.equal(greedy, top1)


def test_padded_tensor_input_and_eos(model):
    pool = _pool_with_three(model)
    engine = ServingEngine(model, pool, eos_token_id=None, pad_token_id=0)
    listed = engine.generate(PROMPTS[:2], ["a", "b"], max_new_tokens=5).new_tokens
    ids = torch.tensor([PROMPTS[0], PROMPTS[1] + [0, 0]], device=DEVICE)  # right padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], device=DEVICE)
    padded = engine.generate(ids, ["a", "b"], max_new_tokens=5, attention_mask=mask).new_tokens
    assert torch.equal(listed, padded)
    stop = int(listed[0, 1])
    out = engine.generate(PROMPTS[:2], ["a", "b"], max_new_tokens=5, eos_token_id=stop, pad_token_id=99)
    row = out.new_tokens[0].tolist()
    assert row[: row.index(stop) + 1] == listed[0, : row.index(stop) + 1].tolist()
    assert all(t == 99 for t in row[row.index(stop) + 1 :])


def test_engine_without_pool_uses_the_layers_adapters(model, launches):
    layers = [m for m in model.modules() if isinstance(m, FastLoRALinear)]
    for i, layer in enumerate(layers):
        layer.add_adapter("x", 3, 6, init_lora_weights=False)
        if i % 2:
            layer.add_adapter("y", 5, 5, init_lora_weights=False)
    engine = ServingEngine(model, eos_token_id=None)
    names = ["y", "x", None]
    out = engine.generate(PROMPTS[:3], names, max_new_tokens=4).new_tokens
    assert launches
    alone = torch.stack([engine.generate([p], [n], max_new_tokens=4).new_tokens[0] for p, n in zip(PROMPTS, names)])
    assert torch.equal(out, alone)


def test_engine_errors(model):
    pool = _pool_with_three(model)
    engine = ServingEngine(model, pool)
    with pytest.raises(KeyError, match="not loaded"):
        engine.generate(PROMPTS[:2], ["a", "zzz"], max_new_tokens=2)
    with pytest.raises(ValueError, match="one name"):
        engine.generate(PROMPTS[:2], ["a"], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPTS[:1], ["a"], max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], ["a"], max_new_tokens=2)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        engine.generate(PROMPTS[:1], ["a"], max_new_tokens=2)
    model.eval()
    assert all(layer.row_adapters is None for layer in engine.layers)
    assert engine.generate(PROMPTS[:1], ["a"], max_new_tokens=0).new_tokens.shape == (1, 0)


def test_batch_adapters_of_loaded_peft_adapters_runs_fused_kernel(tmp_path, launches):
    """fastpeft.load_adapter (PEFT interop) + fastpeft.batch_adapters: rows equal PEFT's
    own model with each adapter, through the fused mixed-adapter kernel; the engine
    without a pool serves the same adapters."""
    fp = pytest.importorskip("fastpeft")
    if not hasattr(fp, "batch_adapters") or not hasattr(fp, "load_adapter"):
        pytest.skip("the PEFT-interop API is not there")
    base = _base_model()
    p1, pm1 = _peft_dir(tmp_path, base, "one", 8, 16, 21)
    p2, pm2 = _peft_dir(tmp_path, base, "two", 4, 4, 22)
    model = copy.deepcopy(base)
    fp.load_adapter(model, p1, adapter_name="one")
    fp.load_adapter(model, p2, adapter_name="two")
    model.eval()
    ids = torch.tensor([PROMPTS[0], PROMPTS[2][:4], PROMPTS[3] + [2]], device=DEVICE)
    with torch.no_grad():
        with fp.batch_adapters(model, ["one", None, "two"]):
            logits = model(ids).logits
        ref = torch.cat([pm1(ids[0:1]).logits, base(ids[1:2]).logits, pm2(ids[2:3]).logits])
    assert launches, "batch_adapters did not run the fused mixed-adapter kernel"
    assert rel_err(logits, ref) < 1e-5
    out = ServingEngine(model, eos_token_id=None).generate(PROMPTS[:2], ["two", "one"], max_new_tokens=4)
    for row, (prompt, pm) in enumerate(zip(PROMPTS[:2], (pm2, pm1))):
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            for _ in range(4):
                ids = torch.cat([ids, pm(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.new_tokens[row].tolist() == ids[0, -4:].tolist()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_after_adapter_swap():
    """Swapping adapters changes no tensor shape or address: a CUDA graph captured once
    (metadata build included) stays valid and computes with the new adapter."""
    pool = AdapterPool({"proj": (64, 48)}, max_adapters=2, max_rank=16, device=DEVICE, dtype=torch.float16)
    ls = pool.layers["proj"]
    pool.load("a", {"proj": (torch.randn(4, 64) / 8, torch.randn(48, 4) / 2)}, scaling=1.0)
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(48, 64, device=DEVICE, dtype=torch.float16) / 8
    rs = torch.tensor([0, -1, 0, 0, -1, 0, 0, 0], device=DEVICE, dtype=torch.int32)

    def step():
        return ops_multi.multi_lora_linear(x, w, None, ls.lora_A, ls.lora_B, ls.ranks, ls.scalings, rs, check=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    pool.unload("a")
    pool.load("b", {"proj": (torch.randn(16, 64) / 8, torch.randn(48, 16) / 4)}, scaling=0.5)
    assert pool.slot_of("b") == 0
    graph.replay()
    torch.cuda.synchronize()
    ref = ops_multi.multi_lora_linear(x.double(), w.double(), None, ls.lora_A.double(), ls.lora_B.double(),
                                      ls.ranks, ls.scalings, rs, backend="torch")
    assert rel_err(out, ref) < 5e-3


def test_load_peft_state_dict_with_peft_config(tmp_path):
    """In-memory PEFT tensors (adapter-name segment in the keys) with PEFT's own config
    object: same slots as loading the directory."""
    peft = pytest.importorskip("peft")
    base = _base_model()
    path, pm = _peft_dir(tmp_path, base, "one", 4, 12, 31, rank_pattern={"q_proj": 2})
    tensors = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in peft.get_peft_model_state_dict(pm).items()}
    model = _inject(copy.deepcopy(base))
    pool = AdapterPool(model, max_adapters=2, max_rank=8)
    pool.load("dir", path)
    pool.load("mem", tensors, config=pm.peft_config["default"])
    for ls in pool.layers.values():
        a, b = pool.slot_of("dir"), pool.slot_of("mem")
        assert int(ls.ranks[a]) == int(ls.ranks[b]) and float(ls.scalings[a]) == float(ls.scalings[b])
        assert torch.equal(ls.lora_A[a], ls.lora_A[b]) and torch.equal(ls.lora_B[a], ls.lora_B[b])
    q = pool.layers["model.layers.0.self_attn.q_proj"]
    assert q.ranks[:2].tolist() == [2, 2] and float(q.scalings[0]) == pytest.approx(6.0)


def test_detach_returns_layers_to_their_own_adapters(model):
    pool = _pool_with_three(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    layer.add_adapter("own", 3, 3, init_lora_weights=False)
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(KeyError, match="from the pool or from the layers"):
        with fp.batch_adapters(model, ["a", "own"]):
            layer(x)
    pool.detach()
    assert "AdapterPool(" in repr(pool)
    layer.row_adapters = ["own", None]
    with torch.no_grad():
        y = layer(x)
    layer.row_adapters = None
    ref = lora_linear_ref(x.double(), layer.weight.double(), layer.bias, layer.adapters["own"].lora_A.double(),
                          layer.adapters["own"].lora_B.double(), layer.adapters["own"].scaling)
    assert rel_err(y[:1], ref[:1]) < 1e-5 and rel_err(y[1:], F.linear(x[1:], layer.weight, layer.bias)) < 1e-6


def test_batch_adapters_accepts_pool_adapters(model, launches):
    """fp.batch_adapters takes names loaded only in the attached pool; each row equals
    its adapter run alone; unknown names are still refused."""
    pool = _pool_with_three(model)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0], PROMPTS[0]], device=DEVICE)
    with torch.no_grad(), fp.batch_adapters(model, ["b", None, "a"]):
        mixed = model(ids).logits
    assert launches
    for row, name in enumerate(["b", None, "a"]):
        with torch.no_grad(), fp.batch_adapters(model, [name]):
            alone = model(ids[:1]).logits
        assert rel_err(mixed[row], alone[0]) < 1e-5
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with fp.batch_adapters(model, ["zz", None, "a"]):
            pass
    assert pool.adapters  # the pool is untouched by the refused call


def test_one_plan_per_generate_metadata_once_per_row_shape(model, monkeypatch):
    """A generate call asks the pool once (one LRU touch) and builds the mixed-batch
    metadata once per row-token shape (prompt, then one token), shared by every layer,
    instead of once per layer and step."""
    import fastpeft.methods.lora.stacks as stacks

    pool = _pool_with_three(model)
    touches, builds = [], []
    real_touch, real_build = pool.touch, stacks.build_meta
    monkeypatch.setattr(pool, "touch", lambda names: touches.append(list(names)) or real_touch(names))
    monkeypatch.setattr(stacks, "build_meta", lambda *a, **k: builds.append(a[0].shape) or real_build(*a, **k))
    names = ["a", "b", None, "c"]
    ServingEngine(model, pool, eos_token_id=None).generate(PROMPTS, names, max_new_tokens=3)
    assert touches == [names]
    assert builds == [(4 * 6,), (4,)]  # 6 prompt tokens per row (left-padded), then 1


def test_layers_own_adapters_share_metadata_across_layers(model, monkeypatch):
    import fastpeft.methods.lora.stacks as stacks

    layers = [m for m in model.modules() if isinstance(m, FastLoRALinear)]
    for layer in layers:
        layer.add_adapter("x", 3, 6, init_lora_weights=False)
    builds = []
    real_build = stacks.build_meta
    monkeypatch.setattr(stacks, "build_meta", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    ids = torch.tensor([PROMPTS[0], PROMPTS[2][:4]], device=DEVICE)
    with torch.no_grad(), fp.batch_adapters(model, ["x", None]):
        model(ids)
    assert len(layers) == 6 and len(builds) == 1


# ----------------------------------------------------------------------------- refusals (pool unchanged)


def _full_pool(model, dtype=None):
    """A full pool: "a" pinned, "b" the LRU victim a successful load would evict."""
    pool = AdapterPool(model, max_adapters=2, max_rank=8, dtype=dtype)
    pool.load("a", _weights(pool, 4, 1), lora_alpha=4, pin=True)
    pool.load("b", _weights(pool, 2, 2), lora_alpha=2)
    return pool


def _as_peft_dir(tmp_path, tensors, config):
    """A PEFT-format directory (as PEFT's save_pretrained writes it) holding ``tensors``."""
    import json

    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return str(tmp_path)


Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("source", ["pairs", "state_dict", "peft_dir"])
@pytest.mark.parametrize(
    "pool_dtype, adapter_dtype, big",
    [(torch.float16, torch.float32, 1e5), (torch.bfloat16, torch.float32, 3.4e38), (torch.float32, torch.float64, 1e300)],
)
def test_values_that_overflow_the_slot_dtype_are_refused(model, tmp_path, source, pool_dtype, adapter_dtype, big):
    """Finite in the adapter's dtype, inf once cast to the pool's: refused, naming the
    adapter, the layer and the dtype, through every way into the pool; nothing changes
    (no eviction of the LRU adapter, slots, names, order and pins as they were)."""
    pool = _full_pool(model, pool_dtype)
    w = {n: (A.to(adapter_dtype), B.to(adapter_dtype)) for n, (A, B) in _weights(pool, 4, 3).items()}
    w[V][1][3, 1] = -big
    assert torch.isfinite(w[V][1]).all() and not torch.isfinite(w[V][1].to(pool_dtype)).all()
    sd = {f"base_model.model.{n}.lora_{ab}.weight": t for n, AB in w.items() for ab, t in zip("AB", AB)}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": list(TARGETS)}
    kwargs, src = {}, {"pairs": w, "state_dict": sd}.get(source)
    if source == "pairs":
        kwargs = {"lora_alpha": 4}
    elif source == "state_dict":
        kwargs = {"config": cfg}
    else:
        src = _as_peft_dir(tmp_path / "big", sd, cfg)
    snap = _snapshot(pool)
    with pytest.raises(AdapterError) as err:
        pool.load("new", src, **kwargs)
    msg = str(err.value)
    assert "'new'" in msg and V in msg and "lora_B" in msg and str(pool_dtype) in msg, msg
    _assert_same(pool, snap)
    with pytest.raises(AdapterError, match="already loaded"):  # a failed swap keeps the old "b"
        pool.load("b", src, **kwargs)
    _assert_same(pool, snap)
    # The bound is the slot dtype's range, not a fixed threshold: the largest finite value
    # loads, as do values that underflow to zero.
    limit = torch.finfo(pool_dtype).max
    w[V][1][3, 1] = -limit
    w[V][1][0, 0] = torch.finfo(pool_dtype).tiny / 1e10
    pool.unload("b")
    pool.load("ok", w, lora_alpha=4)
    ls = pool.layers[V]
    assert float(ls.lora_B[pool.slot_of("ok"), 3, 1]) == -limit and torch.isfinite(ls.lora_B).all()


def test_non_finite_scaling_is_refused(model):
    pool = _full_pool(model)
    snap = _snapshot(pool)
    with pytest.raises(AdapterError, match="lora_alpha must be a finite number, got inf"):
        pool.load("new", _weights(pool, 4, 3), lora_alpha=float("inf"))
    with pytest.raises(AdapterError, match="scaling is nan"):
        pool.load("new", _weights(pool, 4, 3), scaling={n: float("nan") for n in pool.layers})
    _assert_same(pool, snap)


def _two_adapter_peft_model(base):
    """A PEFT model holding two LoRA adapters, "default" and "other", on q_proj/v_proj."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    pm.add_adapter("other", peft.LoraConfig(**cfg))
    return peft, pm


def test_state_dict_of_two_adapters_is_refused_naming_both(model):
    """PEFT's own state dict of a model with two adapters: each layer has lora_A.default and
    lora_A.other. Refused (which one to serve is ambiguous), naming both keys; either
    adapter's own tensors load, and equal what get_peft_model_state_dict gives."""
    peft, pm = _two_adapter_peft_model(_base_model())
    both = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
    pool = _full_pool(model)
    snap = _snapshot(pool)
    key = f"base_model.model.{Q}.lora_A.%s.weight"
    with pytest.raises(AdapterError) as err:
        pool.load("new", both, lora_alpha=8)
    assert key % "default" in str(err.value) and key % "other" in str(err.value), err.value
    # One adapter's tensors on some layers, the other's on the rest: still two adapters.
    mixed = {k: v for k, v in both.items() if (".default." in k) == (".q_proj." in k)}
    with pytest.raises(AdapterError, match="several adapters") as err:
        pool.load("new", mixed, lora_alpha=8)
    assert "'default'" in str(err.value) and "'other'" in str(err.value)
    _assert_same(pool, snap)
    pool.unload("b")
    pool.load("other", {k: v for k, v in both.items() if ".other." in k}, config=pm.peft_config["other"])
    ref = peft.get_peft_model_state_dict(pm, adapter_name="other")
    ls, slot = pool.layers[Q], pool.slot_of("other")
    assert torch.equal(ls.lora_A[slot, :4], ref[f"base_model.model.{Q}.lora_A.weight"])
    assert torch.equal(ls.lora_B[slot, :, :4], ref[f"base_model.model.{Q}.lora_B.weight"])


@pytest.mark.parametrize("case", ["prefix", "suffix", "pair_and_prefix"])
def test_one_layer_given_twice_is_refused_naming_both(model, case):
    """The same layer under two spellings of its path (with and without PEFT's
    ``base_model.model.`` prefix, or a shorter suffix of it) is ambiguous too."""
    pool = _full_pool(model)
    snap = _snapshot(pool)
    w = _weights(pool, 4, 3)
    sd = {f"base_model.model.{n}.lora_{ab}.weight": t for n, AB in w.items() for ab, t in zip("AB", AB)}
    other = {
        "prefix": f"{Q}.lora_A.weight",
        "suffix": "layers.0.self_attn.q_proj.lora_A.weight",
        "pair_and_prefix": f"{Q}.lora_A.weight",
    }[case]
    sd[other] = torch.randn(4, 32)
    sd[other.replace("lora_A", "lora_B")] = torch.randn(32, 4)
    if case == "pair_and_prefix":  # only lora_A doubled
        del sd[other.replace("lora_A", "lora_B")]
    with pytest.raises(AdapterError) as err:
        pool.load("new", sd, lora_alpha=4)
    assert f"base_model.model.{Q}.lora_A.weight" in str(err.value) and repr(other) in str(err.value), err.value
    _assert_same(pool, snap)


def _ia3_dir(tmp_path, base):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    pm.save_pretrained(str(tmp_path / "ia3"))
    return str(tmp_path / "ia3"), pm


@pytest.mark.parametrize(
    "case", ["ia3_dir", "ia3_state_dict", "ia3_config", "bottleneck_dir", "loha_dir", "loha_state_dict"]
)
def test_non_lora_adapters_are_named_as_such(model, tmp_path, case):
    """An adapter of another method is refused as what it is (from peft_type, or from its
    tensors when no config is given), not blamed on one of its tensors."""
    import fastpeft as fp

    peft = pytest.importorskip("peft")
    base = _base_model()
    pool = _full_pool(model)
    snap = _snapshot(pool)
    kwargs = {}
    if case == "ia3_dir":
        src, what = _ia3_dir(tmp_path, base)[0], r"an \(IA\)\^3 adapter \(peft_type 'IA3' in adapter_config.json"
    elif case == "ia3_state_dict":
        src = peft.get_peft_model_state_dict(_ia3_dir(tmp_path, base)[1])
        kwargs, what = {"lora_alpha": 1}, r"an \(IA\)\^3 adapter \(its tensors include '.*ia3_l'"
    elif case == "ia3_config":  # LoRA-looking tensors, but the config passed is (IA)^3's
        src = _weights(pool, 4, 3)
        kwargs = {"config": peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])}
        what = r"an \(IA\)\^3 adapter \(peft_type 'IA3' in the config passed"
    elif case == "bottleneck_dir":
        bn = copy.deepcopy(base)
        fp.inject(bn, fp.BottleneckConfig(target_modules=["down_proj"], bottleneck_size=4))
        fp.save_adapter(bn, str(tmp_path / "bn"))
        src, what = str(tmp_path / "bn"), r"a bottleneck adapter \(peft_type 'BOTTLENECK'"
    elif case == "loha_dir":
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
        pm.save_pretrained(str(tmp_path / "loha"))
        src, what = str(tmp_path / "loha"), r"a LoHa adapter \(peft_type 'LOHA'"
    elif case == "loha_state_dict":  # as in memory: with the adapter-name segment
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
        src = {k: v for k, v in pm.state_dict().items() if ".hada_" in k}
        kwargs, what = {"lora_alpha": 2}, r"a LoHa adapter \(its tensors include '.*hada_w1_a.default'"
    with pytest.raises(AdapterError, match=what) as err:
        pool.load("new", src, **kwargs)
    assert "the pool serves LoRA adapters only" in str(err.value)
    assert "is not a LoRA A/B weight" not in str(err.value)
    if case.startswith(("ia3", "bottleneck")):  # methods fastpeft runs in the model: say where
        assert "fastpeft.load_adapter" in str(err.value)
    _assert_same(pool, snap)


@pytest.mark.parametrize("case", ["A_vs_B", "config_r", "out_features"])
def test_rank_and_shape_messages_name_the_real_cause(model, case):
    pool = _full_pool(model)
    snap = _snapshot(pool)
    w = _weights(pool, 4, 3)
    kwargs = {"lora_alpha": 4}
    if case == "A_vs_B":
        w[Q] = (w[Q][0], torch.randn(32, 3))
        what = r"lora_A has rank 4 \(shape \(4, 32\)\) but lora_B has rank 3"
    elif case == "config_r":
        w = {f"base_model.model.{Q}.lora_{ab}.weight": t for ab, t in zip("AB", w[Q])}
        kwargs = {"config": {"peft_type": "LORA", "r": 8, "lora_alpha": 4}}
        what = "weights have rank 4 but the config says r=8"
    else:
        w[Q] = (w[Q][0], torch.randn(33, 4))
        what = r"lora_B has shape \(33, 4\) but the layer has out_features 32"
    with pytest.raises(AdapterError, match=what):
        pool.load("new", w, **kwargs)
    _assert_same(pool, snap)
