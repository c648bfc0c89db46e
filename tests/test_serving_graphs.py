"""The engine's static-buffer decode (CUDA-graph replay on a GPU) vs its eager decode.

No GPU here: the static path runs with ``cuda_graphs=capture`` where ``capture`` returns
the step itself (a replay by direct call) and records what it was given, so the tests see
the same buffers, cache and sequence of steps a CUDA graph would replay.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, ON_GPU

from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.serving import graphs
from fastpeft.serving.engine import ServingEngine
from fastpeft.serving.pool import AdapterPool

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 9], [42, 7], [11, 12, 13, 14, 15, 16]]


def _model():
    torch.manual_seed(1234)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if name == "v_proj" and isinstance(child, nn.Linear):  # one fused layer: the interpreter is slow
                setattr(mod, name, FastLoRALinear.from_linear(child, r=2, lora_alpha=2))
    return model.eval()


def _pool(model):
    pool = AdapterPool(model, max_adapters=3, max_rank=8)
    for i, (name, r) in enumerate((("a", 4), ("b", 8))):
        g = torch.Generator().manual_seed(i)
        pool.load(name, {n: (torch.randn(r, ls.in_features, generator=g) * 0.6,
                             torch.randn(ls.out_features, r, generator=g) * 0.6) for n, ls in pool.layers.items()},
                  lora_alpha=2 * r)
    return pool


class DirectCapture:
    """``capture(step) -> step``: replays by calling; records each capture and replay."""

    def __init__(self, engine_ref):
        self.captured, self.replays, self.engine_ref = [], 0, engine_ref

    def __call__(self, step):
        static = self.engine_ref()._static
        self.captured.append((step, _ptrs(static)))

        def replay():
            self.replays += 1
            assert _ptrs(static) == self.captured[-1][1], "a static buffer moved between replays"
            step()

        return replay


def _ptrs(static):
    layers = static.cache.layers
    return (static.ids.data_ptr(), static.positions.data_ptr(), static.mask.data_ptr(),
            tuple(layer.keys.data_ptr() for layer in layers), tuple(layer.values.data_ptr() for layer in layers))


@pytest.fixture
def engines():
    model = _model()
    pool = _pool(model)
    eager = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=False)
    static = ServingEngine(model, pool, eos_token_id=None)
    capture = DirectCapture(lambda: static)
    static.cuda_graphs = capture
    return eager, static, capture, pool


def test_static_decode_equals_eager_greedy_and_sampled(engines):
    eager, static, capture, _ = engines
    names = ["a", None, "b"]
    want = eager.generate(PROMPTS, names, max_new_tokens=6).new_tokens
    got = static.generate(PROMPTS, names, max_new_tokens=6).new_tokens
    assert torch.equal(got, want)
    # one capture per generate call, then replays for tokens 3..6 (token 1: prefill, 2: eager step)
    assert len(capture.captured) == 1 and capture.replays == 4
    # the adapters matter (the comparison is not vacuous)
    assert not torch.equal(got[0], eager.generate([PROMPTS[0]], [None], max_new_tokens=6).new_tokens[0])
    kw = dict(max_new_tokens=4, do_sample=True, temperature=1.3, top_k=30, seed=[3, 4, 5])
    assert torch.equal(static.generate(PROMPTS, names, **kw).new_tokens, eager.generate(PROMPTS, names, **kw).new_tokens)


def test_buffers_stay_put_across_calls_and_pool_loads(engines):
    eager, static, capture, pool = engines
    static.generate(PROMPTS, ["a", "b", None], max_new_tokens=4)
    first = _ptrs(static._static)
    stacks = {n: (ls.lora_A.data_ptr(), ls.lora_B.data_ptr()) for n, ls in pool.layers.items()}
    pool.unload("a")
    g = torch.Generator().manual_seed(9)
    pool.load("c", {n: (torch.randn(2, ls.in_features, generator=g), torch.randn(ls.out_features, 2, generator=g))
                    for n, ls in pool.layers.items()}, lora_alpha=4)
    assert {n: (ls.lora_A.data_ptr(), ls.lora_B.data_ptr()) for n, ls in pool.layers.items()} == stacks
    got = static.generate(PROMPTS, ["c", "b", None], max_new_tokens=5).new_tokens
    assert _ptrs(static._static) == first  # same batch and slot bucket: the same buffers
    assert torch.equal(got, eager.generate(PROMPTS, ["c", "b", None], max_new_tokens=5).new_tokens)
    # a different batch size gets buffers of its own, still equal to eager
    got2 = static.generate(PROMPTS[:2], ["c", None], max_new_tokens=3).new_tokens
    assert static._static.batch == 2
    assert torch.equal(got2, eager.generate(PROMPTS[:2], ["c", None], max_new_tokens=3).new_tokens)


def test_eos_stop_and_short_generations(engines):
    eager, static, capture, _ = engines
    names = ["b", "a", None]
    full = eager.generate(PROMPTS, names, max_new_tokens=6).new_tokens
    eos = int(full[0, 2])
    for n in (0, 2):
        assert torch.equal(static.generate(PROMPTS, names, max_new_tokens=n).new_tokens,
                           eager.generate(PROMPTS, names, max_new_tokens=n).new_tokens)
    kw = dict(max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(static.generate(PROMPTS, names, **kw).new_tokens, eager.generate(PROMPTS, names, **kw).new_tokens)


def test_graphs_only_where_they_can_run(monkeypatch):
    model = _model()
    engine = ServingEngine(model, eos_token_id=None)
    assert engine.cuda_graphs is True
    assert engine._capture(torch.device("cpu")) is None  # CPU: eager
    assert ServingEngine(model, cuda_graphs=False)._capture(torch.device("cuda")) is None
    # A CUDA device with compiled kernels: the CUDA-graph capture (the Triton interpreter runs here).
    monkeypatch.setattr("fastpeft.serving.engine.interpreter_active", lambda: False)
    assert engine._capture(torch.device("cuda")) is graphs.capture_cuda_graph
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", False)
    assert engine._capture(torch.device("cuda")) is None
    with pytest.raises(ValueError, match="StaticCache"):
        ServingEngine(model, cuda_graphs=lambda step: step)._capture(torch.device("cpu"))
    with pytest.raises(TypeError, match="cuda_graphs"):
        ServingEngine(model, cuda_graphs="yes")


@pytest.mark.skipif(not ON_GPU, reason="captures a real CUDA graph")
def test_cuda_graph_decode_equals_eager_on_gpu(monkeypatch):
    import fastpeft.serving.engine as engine_mod

    model = _model()
    pool = _pool(model)
    captured = []
    real = engine_mod.capture_cuda_graph
    monkeypatch.setattr(engine_mod, "capture_cuda_graph", lambda step: captured.append(1) or real(step))
    names = ["a", None, "b"]
    want = ServingEngine(model, pool, eos_token_id=None, cuda_graphs=False).generate(PROMPTS, names, 8).new_tokens
    graph = ServingEngine(model, pool, eos_token_id=None)
    assert torch.equal(graph.generate(PROMPTS, names, 8).new_tokens, want) and captured == [1]
    assert torch.equal(graph.generate(PROMPTS, ["b", "a", None], 8).new_tokens,
                       ServingEngine(model, pool, eos_token_id=None, cuda_graphs=False)
                       .generate(PROMPTS, ["b", "a", None], 8).new_tokens)
