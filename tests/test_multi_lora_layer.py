"""FastLoRALinear's mixed-adapter forward (batch rows with their own adapters) on the
fused kernel: every row equals the layer run with that adapter alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, KERNEL_DTYPES
from numerics import assert_matches_ref, rel_err

from fastpeft.kernels.reference import lora_linear_ref
from fastpeft.methods.lora.layer import FastLoRALinear



def _layer(K, N, adapters, dtype=torch.float32, bias=True, lora_bias=()):
    lin = nn.Linear(K, N, bias=bias, device=DEVICE, dtype=dtype)
    first, *rest = adapters
    layer = FastLoRALinear.from_linear(
        lin, r=first[1], lora_alpha=first[2], adapter_name=first[0], init_lora_weights=False,
        lora_bias=first[0] in lora_bias,
    )
    for name, r, alpha in rest:
        layer.add_adapter(name, r, alpha, init_lora_weights=False, lora_bias=name in lora_bias)
    return layer.eval()


def _alone64(layer, x, names):
    """Row b through adapter names[b] alone (single-adapter reference in float64)."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    out = []
    for b, name in enumerate(names):
        xb = x[b : b + 1].double()
        if name is None or name not in layer.adapters:
            out.append(torch.nn.functional.linear(xb, d(layer.weight), d(layer.bias)))
            continue
        bias = d(layer._effective_bias(name))
        out.append(lora_linear_ref(xb, d(layer.weight), bias, d(layer.adapters[name].lora_A),
                                   d(layer.adapters[name].lora_B), layer.adapters[name].scaling))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_mixed_rows_equal_each_adapter_alone(dtype, launches):
    adapters = [("a", 4, 8), ("b", 33, 16), ("c", 1, 1), ("d", 64, 32)]
    layer = _layer(40, 27, adapters, dtype)
    names = ["b", None, "a", "d", "b", "c", None, "a"]
    x = torch.randn(len(names), 5, 40, device=DEVICE, dtype=dtype)
    layer.row_adapters = names
    with torch.no_grad():
        y = layer(x)
    assert launches, "the fused mixed-adapter kernel did not run"
    ref = _alone64(layer, x, names)
    layer.row_adapters = None
    same = torch.cat([
        (layer.set_adapter(n) or layer)(x[b : b + 1]) if n else torch.nn.functional.linear(x[b : b + 1], layer.weight, layer.bias)
        for b, n in enumerate(names)
    ]).detach()
    assert_matches_ref(y, ref, same, dtype)


def test_names_not_in_layer_run_base_and_2d_input(launches):
    layer = _layer(24, 30, [("a", 3, 6), ("b", 8, 8)])
    names = ["zzz", "b", None, "a"]  # "zzz" did not target this layer: base, as PEFT
    x = torch.randn(4, 24, device=DEVICE)
    layer.row_adapters = names
    with torch.no_grad():
        y = layer(x)
    assert rel_err(y, _alone64(layer, x, names)) < 1e-5
    layer.row_adapters = ["zzz", None, None, "zzz"]  # no adapter at all: plain base
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_lora_bias_rows(launches):
    layer = _layer(24, 20, [("a", 3, 6), ("b", 8, 8)], lora_bias=("b",))
    names = ["b", "a", None, "b"]
    x = torch.randn(4, 3, 24, device=DEVICE)
    layer.row_adapters = names
    with torch.no_grad():
        y = layer(x)
    assert launches
    assert rel_err(y, _alone64(layer, x, names)) < 1e-5


def test_lora_bias_rows_of_a_half_layer_under_cpu_autocast():
    """fp16 layer, fp32 adapters and lora_bias, CPU autocast in bf16: the stacks are built
    with autocast off (CPU autocast refuses to stack fp16), the batch runs in bf16."""
    layer = _layer(24, 20, [("a", 3, 6), ("b", 8, 8)], dtype=torch.float16, lora_bias=("a", "b"))
    for p in [t for a in layer.adapters.values() for t in (a.lora_A, a.lora_B)]:
        p.data = p.data.float()
    layer.row_adapters = ["b", "a", None]
    x = torch.randn(3, 24, dtype=torch.float16)
    layer.to("cpu").backend = "torch"  # bf16: the interpreter cannot run bf16 dots
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), _alone64(layer, x.float(), ["b", "a", None]).float()) < 3e-2


def test_wrong_batch_size_and_training_refused():
    layer = _layer(24, 20, [("a", 3, 6)])
    layer.row_adapters = ["a", None]
    with pytest.raises(ValueError, match="give one name"):
        layer(torch.randn(3, 24, device=DEVICE))
    layer.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        layer(torch.randn(2, 24, device=DEVICE))


def _grads(y: torch.Tensor, g: torch.Tensor, inputs) -> list:
    """``d(y . g)/d inputs``, zeros for inputs ``y`` does not depend on."""
    found = torch.autograd.grad(y, inputs, g, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_of_mixed_batch_equal_each_row_alone(backend):
    """Eval mode, grad on: the gradients of a mixed batch (input, each adapter's A, B and
    lora_bias, the unfrozen base weight and bias) are the sums of each row's gradients
    through its adapter alone (the single-adapter op), on a second batch too."""
    layer = _layer(24, 20, [("a", 3, 6), ("b", 5, 5), ("c", 2, 2)], lora_bias=("b",))
    layer.backend = backend
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    adapters = layer.adapters.values()
    params = [layer.weight, layer.bias, *[a.lora_A for a in adapters], *[a.lora_B for a in adapters],
              *[a.lora_bias for a in adapters if a.lora_bias is not None]]
    labels = ["x", "weight", "bias", *[f"A.{n}" for n in layer.adapters], *[f"B.{n}" for n in layer.adapters],
              "lora_bias.b"]
    names = ["a", "b", None, "a"]
    x = torch.randn(4, 3, 24, device=DEVICE)
    g = torch.randn(4, 3, 20, device=DEVICE)
    layer.row_adapters = names
    for _ in range(2):  # the stacks are rebuilt with their graph for every batch
        xm = x.clone().requires_grad_(True)
        got = _grads(layer(xm), g, [xm, *params])
    layer.row_adapters = None
    want = [torch.zeros_like(t) for t in got]
    for b, name in enumerate(names):
        layer.set_adapter(name)
        xb = x[b : b + 1].clone().requires_grad_(True)
        alone = _grads(layer(xb), g[b : b + 1], [xb, *params])
        want[0][b : b + 1] = alone[0]
        for total, d in zip(want[1:], alone[1:]):
            total += d
    for label, out, ref in zip(labels, got, want):
        assert rel_err(out, ref) < 1e-5, label
    assert not got[labels.index("A.c")].any() and not got[labels.index("B.c")].any()  # "c" serves no row


def test_stacks_kept_from_a_no_grad_batch_do_not_cut_the_backward():
    """A mixed batch run under no_grad keeps its stacks; the next call with grad on must
    not reuse them (they hold no graph): the adapters get their gradients."""
    layer = _layer(24, 20, [("a", 3, 6), ("b", 5, 5)])
    layer.row_adapters = ["a", "b"]
    x = torch.randn(2, 3, 24, device=DEVICE)
    with torch.no_grad():
        layer(x)
    y = layer(x)
    assert y.requires_grad
    y.sum().backward()
    for name, adapter in layer.adapters.items():
        assert adapter.lora_A.grad is not None and adapter.lora_A.grad.abs().sum() > 0, name


def test_batch_stacks_are_reused_until_names_or_weights_change(monkeypatch):
    """Decoding step after step with one batch stacks the adapters once; an in-place
    update of an adapter, a new name list or lora_bias change it, and results follow."""
    layer = _layer(24, 20, [("a", 4, 8), ("b", 9, 9)], lora_bias=("b",))
    stacked = []
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacked.append(1) or real_stack(*a, **k))
    names = ["b", None, "a"]
    x = torch.randn(3, 5, 24, device=DEVICE)
    with torch.no_grad():
        layer.row_adapters = names
        first = layer(x)
        n = len(stacked)
        assert torch.equal(layer(x), first) and len(stacked) == n  # reused
        layer.adapters["a"].lora_B.mul_(2.0)  # in place: the cache must notice
        changed = layer(x)
        assert len(stacked) > n
        assert rel_err(changed, _alone64(layer, x, names)) < 1e-5
        assert not torch.equal(changed[2], first[2]) and torch.equal(changed[1], first[1])
        layer.adapters["b"].lora_bias.add_(1.0)
        assert rel_err(layer(x), _alone64(layer, x, names)) < 1e-5
        layer.row_adapters = ["a", "a", None]
        assert rel_err(layer(x), _alone64(layer, x, ["a", "a", None])) < 1e-5
    layer.row_adapters = None
