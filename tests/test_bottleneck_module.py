"""BottleneckLinear: identity at init, fused vs unfused math, layer-norm variants, cache, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from numerics import rel_err

import fastpeft.methods.bottleneck.op as ops
from fastpeft.methods.bottleneck.layer import BottleneckAdapter, BottleneckLinear, bottleneck_size_for
from fastpeft.kernels import bottleneck as bn_kernels
from fastpeft.kernels.reference import bottleneck_linear_ref


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = bn_kernels.bottleneck_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._bn_kernels, "bottleneck_linear_fwd", spy)
    return calls


def _ref64(layer, x, name="default"):
    a = layer.adapters[name]
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    ln = lambda m: None if m is None else (d(m.weight), d(m.bias))  # noqa: E731
    return bottleneck_linear_ref(
        d(x), d(layer.base_weight()), d(layer.bias), d(a.down.weight), d(a.down.bias), d(a.up.weight),
        d(a.up.bias), a.scaling, a.non_linearity, ln(a.adapter_norm_before), ln(a.adapter_norm_after),
        a.residual_before_ln, a.adapter_norm_before.eps if a.adapter_norm_before is not None else 1e-5,
    )


@pytest.mark.parametrize("ln_before,ln_after", [(False, False), (False, True)])
def test_identity_at_init(ln_before, ln_after, kernel_calls):
    lin = nn.Linear(24, 20, device=DEVICE)
    layer = BottleneckLinear.from_linear(lin, reduction_factor=4, ln_after=ln_after)
    assert layer.adapters["default"].bottleneck_size == 5
    assert layer.weight.data_ptr() == lin.weight.data_ptr() and not layer.weight.requires_grad
    x = torch.randn(2, 7, 24, device=DEVICE)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    assert bool(kernel_calls) == (not ln_after)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "swish", "tanh"])
def test_fused_matches_unfused_module(act, kernel_calls):
    lin = nn.Linear(30, 26, device=DEVICE)
    layer = BottleneckLinear.from_linear(lin, bottleneck_size=7, non_linearity=act, scaling=0.5, init_weights=False)
    x = torch.randn(3, 5, 30, device=DEVICE)
    y = layer(x)
    assert kernel_calls
    assert rel_err(y, _ref64(layer, x)) < 1e-5
    unfused = layer.adapters["default"](lin(x))  # the adapter module's own PyTorch forward
    assert rel_err(y, unfused.double()) < 1e-5


@pytest.mark.parametrize("ln_before,ln_after,res_before", [(True, False, True), (True, False, False), (True, True, True)])
def test_layer_norm_variants(ln_before, ln_after, res_before):
    layer = BottleneckLinear.from_linear(nn.Linear(16, 12, device=DEVICE), bottleneck_size=4, non_linearity="gelu",
                                         ln_before=ln_before, ln_after=ln_after, residual_before_ln=res_before,
                                         init_weights=False)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 16, device=DEVICE)
    assert rel_err(layer(x), _ref64(layer, x)) < 1e-5


def test_training_updates_only_adapter_and_cache_follows():
    layer = BottleneckLinear.from_linear(nn.Linear(20, 18, device=DEVICE), bottleneck_size=6, init_weights=False)
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["adapters.default.adapter_down.0.bias", "adapters.default.adapter_down.0.weight",
                         "adapters.default.adapter_up.bias", "adapters.default.adapter_up.weight"]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 20, device=DEVICE)
    for _ in range(2):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
        # After each step the cached W_eff must follow the new down-projection.
        assert rel_err(layer(x), _ref64(layer, x)) < 1e-5


def test_cache_invalidated_by_copy():
    layer = BottleneckLinear.from_linear(nn.Linear(12, 10, device=DEVICE), bottleneck_size=3, init_weights=False)
    x = torch.randn(4, 12, device=DEVICE)
    layer(x)
    with torch.no_grad():
        layer.adapters["default"].down.weight.copy_(torch.randn(3, 10))
        layer.weight.mul_(2)
    assert rel_err(layer(x), _ref64(layer, x)) < 1e-5


def test_named_adapters_and_mixed_batch():
    layer = BottleneckLinear.from_linear(nn.Linear(12, 10, device=DEVICE), bottleneck_size=3, init_weights=False)
    layer.add_adapter("b", bottleneck_size=5, non_linearity="tanh", init_weights=False)
    x = torch.randn(3, 2, 12, device=DEVICE)
    layer.row_adapters = ["b", None, "default"]
    y = layer(x)
    layer.row_adapters = None
    assert rel_err(y[0], _ref64(layer, x[0], "b")) < 1e-5
    torch.testing.assert_close(y[1], torch.nn.functional.linear(x[1], layer.weight, layer.bias))
    assert rel_err(y[2], _ref64(layer, x[2])) < 1e-5
    layer.set_adapter("b")
    assert rel_err(layer(x), _ref64(layer, x, "b")) < 1e-5
    layer.delete_adapter("b")
    assert layer.adapter_names == ["default"] and layer.active_adapter == "default"
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()


def test_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 12).to(DEVICE)
    layer = BottleneckLinear.from_conv1d(conv, bottleneck_size=4, init_weights=False)
    x = torch.randn(5, 12, device=DEVICE)
    assert rel_err(layer(x), _ref64(layer, x)) < 1e-5


def test_bad_inputs_change_nothing():
    layer = BottleneckLinear.from_linear(nn.Linear(12, 10, device=DEVICE), bottleneck_size=3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="unknown non-linearity 'mish'"):
        layer.add_adapter("b", bottleneck_size=3, non_linearity="mish")
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        layer.add_adapter("b", bottleneck_size=0)
    with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
        layer.add_adapter("b", reduction_factor=-2)
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        layer.add_adapter("b", bottleneck_size=2, scaling=float("nan"))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default", bottleneck_size=2)
    assert layer.adapter_names == ["default"]
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError, match="from_linear"):
        BottleneckLinear(12, 10)
    with pytest.raises(TypeError, match="nn.Linear"):
        BottleneckLinear.from_linear(nn.Conv1d(2, 2, 1))
    assert bottleneck_size_for(4096, None, 64) == 64 and bottleneck_size_for(8, None, 16) == 1


def test_adapter_module_standalone():
    a = BottleneckAdapter(8, 2, "relu", init_weights=True)
    h = torch.randn(3, 8)
    torch.testing.assert_close(a(h), h)


def test_fp16_layer(kernel_calls):
    layer = BottleneckLinear.from_linear(nn.Linear(40, 24, device=DEVICE, dtype=torch.float16), bottleneck_size=8,
                                         non_linearity="silu", init_weights=False)
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16 and kernel_calls
    assert rel_err(y, _ref64(layer, x)) < 5e-3
