"""The Method protocol with methods registered from this file: one that WRAPS a module
(an embedding gets a learned offset), one that joins the model through FORWARD HOOKS
(a learned bias on the logits, with training hooks), one given as a MethodSpec (leaf
swap). Each goes through inject, set_adapter, delete_adapter, save/load, mixed batches
and unload exactly as the built-in methods do, and a failure anywhere undoes everything."""
from __future__ import annotations

import ast
import pathlib
from dataclasses import dataclass
from typing import ClassVar, List, Optional

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import fastpeft as fp
import fastpeft.core.inject as core_inject
from fastpeft.core import method as core_method
from fastpeft.core.config import AdapterConfig
from fastpeft.core.layer import HookedLayer, ModuleWrapper
from fastpeft.core.linear import AdapterLinear
from fastpeft.core.method import Attach, Method
from fastpeft.core.state import adapter_layers, adapter_loss, adapter_step

transformers = pytest.importorskip("transformers")

from tiny_models import assert_same_snapshot, input_ids, logits, snapshot, tiny_llama  # noqa: E402

HIDDEN, VOCAB = 32, 100


# ----------------------------------------------------------------------------- WRAP: an embedding offset


@dataclass
class OffsetConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_OFFSET"
    init_scale: float = 0.0


class Offset(nn.Module):
    def __init__(self, dim: int, init_scale: float) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(dim) * init_scale)


class OffsetEmbedding(ModuleWrapper):
    """``embedding(ids) + offset`` of the active adapter; per batch row in a mixed batch."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._init_wrapper(embedding)

    def add_adapter(self, name: str, init_scale: float) -> None:
        self._check_new_name(name)
        self._added(name, Offset(self.base_layer.embedding_dim, init_scale))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(ids)
        plan = self.batch_plan
        if plan is not None:
            plan.check_batch(ids)
            zero = torch.zeros_like(out[0, 0])
            rows = [self.adapters[n].offset if n in self.adapters else zero for n in plan.rows]
            return out + torch.stack(rows)[:, None, :]
        if self.active_adapter is None:
            return out
        return out + self.adapters[self.active_adapter].offset


class OffsetMethod(Method):
    peft_type = "TOY_OFFSET"
    config_cls = OffsetConfig
    attach = Attach.WRAP
    layer_types = (OffsetEmbedding,)
    target_types = (nn.Embedding,)
    merges = False

    def build_layer(self, path, module, config, adapter_name, backend):
        layer = OffsetEmbedding(module)
        layer.add_adapter(adapter_name, config.init_scale)
        return layer

    def add_to_layer(self, path, layer, config, adapter_name):
        layer.add_adapter(adapter_name, config.init_scale)


# ----------------------------------------------------------------------------- HOOKS: a logit bias


@dataclass
class LogitBiasConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_LOGIT_BIAS"
    vocab: int = VOCAB


class Bias(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))


class LogitBias(HookedLayer):
    """Adds the active adapter's bias to the model's logits (a forward hook on the model)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self._init_hooks()
        self.vocab = vocab

    def add_adapter(self, name: str) -> None:
        self._check_new_name(name)
        self._added(name, Bias(self.vocab))

    def hooks(self, model: nn.Module) -> List:
        return [model.register_forward_hook(self._add_bias)]

    def _add_bias(self, module, args, output):
        if self.active_adapter is not None:
            output.logits = output.logits + self.adapters[self.active_adapter].bias
        return output


class LogitBiasMethod(Method):
    peft_type = "TOY_LOGIT_BIAS"
    config_cls = LogitBiasConfig
    attach = Attach.HOOKS
    hook_site = "toy_logit_bias"
    layer_types = (LogitBias,)
    merges = False
    mixed_batches = False

    def __init__(self) -> None:
        self.steps: List[int] = []

    def build_layer(self, path, model, config, adapter_name, backend):
        layer = LogitBias(config.vocab)
        layer.add_adapter(adapter_name)
        return layer

    def add_to_layer(self, path, layer, config, adapter_name):
        layer.add_adapter(adapter_name)

    def save_keys(self, model, adapter_name, config):
        # A key map of the method's own naming, no ".weight" (as AdaLoRA's lora_E).
        return {"logit_bias": model.toy_logit_bias.adapters[adapter_name].bias}

    def extra_loss(self, model, adapter_name, config) -> Optional[torch.Tensor]:
        return model.toy_logit_bias.adapters[adapter_name].bias.square().sum()

    def on_step(self, model, adapter_name, config, global_step) -> None:
        self.steps.append(global_step)


@pytest.fixture
def toy_methods():
    """Register the toy methods for one test (the registry is left as it was)."""
    methods = {"offset": OffsetMethod(), "bias": LogitBiasMethod()}
    for m in methods.values():
        fp.register_method(m)
    yield methods
    for m in methods.values():
        core_method._METHODS.pop(m.peft_type)


def _embed(model, ids):
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.add_(torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- WRAP tests


def test_wrapping_method_injects_switches_and_unloads(toy_methods):
    model = tiny_llama()
    original = model.model.embed_tokens
    ids = input_ids()
    base = logits(model, ids)
    fp.inject(model, OffsetConfig(target_modules=["embed_tokens"], init_scale=0.5), "a")
    layer = model.model.embed_tokens
    assert isinstance(layer, OffsetEmbedding) and layer.base_layer is original
    assert layer.weight is original.weight  # the model reads the wrapped module's attributes
    assert not original.weight.requires_grad and layer.adapters["a"].offset.requires_grad
    offset_a = layer.adapters["a"].offset.detach()
    torch.testing.assert_close(_embed(model, ids), original(ids) + offset_a)
    assert (logits(model, ids) - base).abs().max() > 1e-3

    fp.inject(model, OffsetConfig(target_modules=["embed_tokens"], init_scale=0.5), "b")  # add_to_layer
    assert layer.adapter_names == ["a", "b"] and fp.active_adapter(model) == "a"
    fp.set_adapter(model, "b")
    torch.testing.assert_close(_embed(model, ids), original(ids) + layer.adapters["b"].offset.detach())
    assert layer.adapters["b"].offset.requires_grad and not layer.adapters["a"].offset.requires_grad
    with torch.no_grad(), fp.batch_adapters(model, ["a", None, "b"]):  # a mixed batch through the plan
        mixed = _embed(model, ids)
    torch.testing.assert_close(mixed[0], original(ids[:1])[0] + offset_a)
    torch.testing.assert_close(mixed[1], original(ids[1:2])[0])
    with pytest.raises(ValueError, match="cannot be merged"):
        fp.merge(model, "b")
    fp.set_adapter(model, None)
    torch.testing.assert_close(logits(model, ids), base)
    fp.delete_adapter(model, "b")
    assert layer.adapter_names == ["a"] and fp.adapter_names(model) == ["a"]
    fp.unload(model, merge_adapter=False)
    assert model.model.embed_tokens is original
    torch.testing.assert_close(logits(model, ids), base)


def test_wrapping_method_round_trips_through_save_and_load(toy_methods, tmp_path):
    model = fp.inject(tiny_llama(), OffsetConfig(target_modules=["embed_tokens"], init_scale=0.5), "a")
    ids = input_ids()
    expected = logits(model, ids)
    fp.save_adapter(model, tmp_path, "a")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["base_model.model.model.embed_tokens.offset"]
    loaded = fp.load_adapter(tiny_llama(), tmp_path, adapter_name="x")
    assert isinstance(loaded.model.embed_tokens, OffsetEmbedding) and fp.adapter_names(loaded) == ["x"]
    torch.testing.assert_close(logits(loaded, ids), expected)
    assert not loaded.model.embed_tokens.adapters["x"].offset.requires_grad  # is_trainable=False


def test_wrapping_method_undoes_everything_on_failure(toy_methods, tmp_path, monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    original = model.model.embed_tokens
    with pytest.raises(ValueError, match="adapts only Embedding"):
        fp.inject(model, OffsetConfig(target_modules=["embed_tokens", "q_proj"]))
    assert_same_snapshot(before, snapshot(model))

    # A failure after the wrapper is in place (the last step of inject) is undone too.
    def boom(model):
        raise RuntimeError("late failure")

    monkeypatch.setattr(core_inject, "mark_trainable", boom)
    with pytest.raises(RuntimeError, match="late failure"):
        fp.inject(model, OffsetConfig(target_modules=["embed_tokens"], init_scale=0.5))
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(model))
    assert model.model.embed_tokens is original

    # A checkpoint that does not fit: load_adapter leaves no trace.
    fp.save_adapter(fp.inject(tiny_llama(), OffsetConfig(target_modules=["embed_tokens"])), tmp_path)
    save_file({"base_model.model.model.embed_tokens.offset": torch.zeros(HIDDEN + 1)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        fp.load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))
    assert model.model.embed_tokens is original


# ----------------------------------------------------------------------------- HOOKS tests


def test_hook_method_injects_trains_saves_loads_and_unloads(toy_methods, tmp_path):
    model = tiny_llama()
    ids = input_ids()
    base = logits(model, ids)
    fp.inject(model, LogitBiasConfig(), "a")
    holder = model.toy_logit_bias
    assert isinstance(holder, LogitBias) and len(model._forward_hooks) == 1
    torch.testing.assert_close(logits(model, ids), base)  # zero init: the model is unchanged
    _perturb(model, "a", 1)
    torch.testing.assert_close(logits(model, ids), base + holder.adapters["a"].bias.detach())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["toy_logit_bias.adapters.a.bias"]

    # Training hooks: the extra loss term and the per-step callback of the active adapter.
    loss = adapter_loss(model)
    loss.backward()
    torch.testing.assert_close(holder.adapters["a"].bias.grad, 2 * holder.adapters["a"].bias.detach())
    adapter_step(model, 7)
    assert toy_methods["bias"].steps == [7]

    fp.inject(model, LogitBiasConfig(), "b")
    _perturb(model, "b", 2)
    fp.set_adapter(model, "b")
    torch.testing.assert_close(logits(model, ids), base + holder.adapters["b"].bias.detach())
    with pytest.raises(ValueError, match="mixed batches"):
        with fp.batch_adapters(model, ["a", "b", None]):
            pass
    expected = logits(model, ids)
    fp.save_adapter(model, tmp_path, "b")
    assert list(load_file(str(tmp_path / "adapter_model.safetensors"))) == ["base_model.model.logit_bias"]
    loaded = fp.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected)

    fp.delete_adapter(model, "b")
    assert fp.active_adapter(model) == "a" and holder.adapter_names == ["a"]
    fp.unload(model, merge_adapter=False)
    assert "toy_logit_bias" not in dict(model.named_children()) and not model._forward_hooks
    torch.testing.assert_close(logits(model, ids), base)


def test_hook_method_undoes_everything_on_failure(toy_methods, monkeypatch):
    model = tiny_llama()
    before = snapshot(model)

    def boom(model):
        raise RuntimeError("late failure")

    monkeypatch.setattr(core_inject, "mark_trainable", boom)
    with pytest.raises(RuntimeError, match="late failure"):
        fp.inject(model, LogitBiasConfig())
    assert_same_snapshot(before, snapshot(model))
    assert not model._forward_hooks and not hasattr(model, "toy_logit_bias")


def test_hook_site_must_be_free(toy_methods):
    model = tiny_llama()
    model.toy_logit_bias = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="already uses"):
        fp.inject(model, LogitBiasConfig())


# ----------------------------------------------------------------------------- MethodSpec (dataclass form)


@dataclass
class GainConfig(AdapterConfig):
    peft_type: ClassVar[str] = "TOY_GAIN"


class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))


class GainLinear(AdapterLinear):
    """``linear(x) * gain``: a leaf swap that merges (folds the gain into the weights)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._init_base(linear.weight, linear.bias)

    def add_adapter(self, name: str) -> None:
        self._check_new_name(name)
        self._added(name, Gain())

    def forward(self, x):
        out = nn.functional.linear(x, self.weight, self.bias)
        if self.active_adapter is None or self.merged:
            return out
        return out * self.adapters[self.active_adapter].gain

    def _fold(self, adapter_name, weight, bias, inverse=False):
        g = self.adapters[adapter_name].gain.detach()
        g = 1 / g if inverse else g
        return weight * g, bias * g

    def _undo_merge(self, adapter_name):
        self._write_base(*self._fold(adapter_name, self.weight.detach(), self.bias.detach(), inverse=True))


def _gain_layer(path, module, config, adapter_name, backend):
    layer = GainLinear(module)
    layer.add_adapter(adapter_name)
    return layer


def test_method_spec_is_the_protocols_dataclass_form(tmp_path):
    spec = fp.MethodSpec(
        peft_type="TOY_GAIN", config_cls=GainConfig, layer_types=(GainLinear,), target_types=(nn.Linear,),
        build_layer=_gain_layer, add_to_layer=lambda path, layer, config, name: layer.add_adapter(name),
        param_map=lambda model, name, config: {
            f"{p}.gain": m.adapters[name].gain for p, m in model.named_modules()
            if isinstance(m, GainLinear) and name in m.adapters
        },
    )
    assert isinstance(fp.register_method(spec), Method)
    try:
        model = fp.inject(tiny_llama(), GainConfig(target_modules=["o_proj"]))
        layer = model.model.layers[0].self_attn.o_proj
        assert isinstance(layer, GainLinear) and spec.check_config(GainConfig()) == []
        with torch.no_grad():
            layer.adapters["default"].gain.fill_(1.5)
        ids = input_ids()
        expected = logits(model, ids)
        fp.merge(model, safe_merge=True)
        assert layer.merged and layer.merged_adapters == ["default"]
        torch.testing.assert_close(logits(model, ids), expected)
        fp.save_adapter(fp.unmerge(model), tmp_path)
        torch.testing.assert_close(logits(fp.load_adapter(tiny_llama(), tmp_path), ids), expected)
    finally:
        core_method._METHODS.pop("TOY_GAIN")


# ----------------------------------------------------------------------------- layering


def _imports(path: pathlib.Path) -> List[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_imports_flow_one_way():
    """kernels -> fastpeft.core -> fastpeft.methods -> fastpeft.serving / the API: the
    core imports no method and nothing above it; a method imports no other method (but
    may build on another method's public op module, e.g. AdaLoRA on LoRA's fused op) and
    no serving code."""
    root = pathlib.Path(fp.__file__).parent
    for path in (root / "core").glob("*.py"):
        bad = [m for m in _imports(path) if m.startswith(("fastpeft.methods", "fastpeft.serving"))]
        assert not bad, f"{path.name} imports {bad}"
    for package in (root / "methods").iterdir():
        if not package.is_dir() or package.name.startswith("_"):
            continue
        for path in package.glob("*.py"):
            bad = [m for m in _imports(path) if m.startswith("fastpeft.serving")
                   or (m.startswith("fastpeft.methods.") and not m.startswith(f"fastpeft.methods.{package.name}")
                       and not m.endswith((".op", ".multi_op")))]
            assert not bad, f"methods/{package.name}/{path.name} imports {bad}"
