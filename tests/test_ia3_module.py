"""IA3Linear: drop-in for nn.Linear, named adapters, merge/unmerge, parity with PEFT's layer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from numerics import rel_err

import fastpeft.methods.ia3.op as ops
from fastpeft.methods.ia3.layer import IA3Linear
from fastpeft.kernels import ia3 as ia3_kernels
from fastpeft.kernels.reference import ia3_linear_ref


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = ia3_kernels.ia3_linear_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops._ia3_kernels, "ia3_linear_fwd", spy)
    return calls


def _linear(K=24, N=20, bias=True):
    return nn.Linear(K, N, bias=bias, device=DEVICE)


@pytest.mark.parametrize("ff", [False, True])
def test_from_linear_at_init_equals_base(ff, kernel_calls):
    lin = _linear()
    layer = IA3Linear.from_linear(lin, is_feedforward=ff)
    assert layer.weight.data_ptr() == lin.weight.data_ptr() and not layer.weight.requires_grad
    assert layer.adapters["default"].ia3_l.shape == ((1, 24) if ff else (20, 1))
    x = torch.randn(2, 5, 24, device=DEVICE)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)
    assert kernel_calls


@pytest.mark.parametrize("ff", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_reference_and_trains(ff, bias, kernel_calls):
    layer = IA3Linear(24, 20, bias=bias, is_feedforward=ff, device=DEVICE, init_ia3_weights=False)
    x = torch.randn(3, 7, 24, device=DEVICE)
    y = layer(x)
    ref = ia3_linear_ref(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double(),
                         layer.ia3_vector.double(), ff)
    assert rel_err(y, ref) < 1e-5
    y.square().sum().backward()
    assert layer.ia3_vector.grad is not None and layer.weight.grad is None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.ia3_l"]


@pytest.mark.parametrize("ff", [False, True])
def test_matches_peft_layer(ff):
    from peft import IA3Config as PeftIA3Config
    from peft.tuners.ia3.layer import Linear as PeftIA3Layer

    lin = _linear()
    peft_layer = PeftIA3Layer(copy.deepcopy(lin), "default", PeftIA3Config(init_ia3_weights=False), is_feedforward=ff)
    ours = IA3Linear.from_linear(lin, is_feedforward=ff)
    ours.load_vector("default", peft_layer.ia3_l["default"].detach())
    x = torch.randn(4, 24, device=DEVICE)
    assert rel_err(ours(x), peft_layer(x).double()) < 1e-5
    peft_layer.merge()
    ours.merge()
    torch.testing.assert_close(ours.weight, peft_layer.base_layer.weight)
    torch.testing.assert_close(ours.bias, peft_layer.base_layer.bias)


@pytest.mark.parametrize("ff", [False, True])
def test_merge_unmerge(ff):
    layer = IA3Linear(24, 20, is_feedforward=ff, device=DEVICE, init_ia3_weights=False)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(6, 24, device=DEVICE)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), y) < 1e-5
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias, b0, rtol=0, atol=0 if ff else 1e-6)
    assert rel_err(layer(x), y) < 1e-5


def test_named_adapters_switch_and_delete():
    layer = IA3Linear(16, 12, device=DEVICE)
    layer.add_adapter("b", init_ia3_weights=False)
    x = torch.randn(3, 16, device=DEVICE)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert layer.active_adapter == "default"
    torch.testing.assert_close(layer(x), base, rtol=1e-6, atol=1e-6)
    layer.set_adapter("b")
    assert rel_err(layer(x), base * layer.adapters["b"].ia3_l.reshape(-1)) < 1e-5
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), base)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        layer.set_adapter("c")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b")
    layer.set_adapter("b")
    layer.merge()
    layer.delete_adapter("b")  # unmerges first
    assert layer.active_adapter == "default" and not layer.merged
    torch.testing.assert_close(layer(x), base, rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows():
    layer = IA3Linear(16, 12, device=DEVICE, init_ia3_weights=False)
    layer.add_adapter("b", init_ia3_weights=False)
    x = torch.randn(3, 4, 16, device=DEVICE)
    layer.row_adapters = ["b", None, "default"]
    y = layer(x)
    layer.row_adapters = None
    layer.set_adapter("b")
    torch.testing.assert_close(y[0], layer(x[0:1])[0])
    layer.set_adapter(None)
    torch.testing.assert_close(y[1], layer(x[1:2])[0])
    layer.set_adapter("default")
    torch.testing.assert_close(y[2], layer(x[2:3])[0])


def test_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(20, 24).to(DEVICE)
    torch.nn.init.normal_(conv.bias)
    layer = IA3Linear.from_conv1d(conv, init_ia3_weights=False)
    x = torch.randn(5, 24, device=DEVICE)
    ref = conv(x) * layer.ia3_vector.reshape(-1)
    assert rel_err(layer(x), ref.double()) < 1e-5
    layer.merge()
    assert rel_err(conv(x), ref.double()) < 1e-5  # weights shared with the Conv1D


def test_bad_vector_shape_changes_nothing():
    layer = IA3Linear(16, 12, device=DEVICE, is_feedforward=True)
    before = layer.adapters["default"].ia3_l.detach().clone()
    with pytest.raises(ValueError, match=r"must have shape \(1, 16\), got \(12, 1\)"):
        layer.load_vector("default", torch.ones(12, 1))
    torch.testing.assert_close(layer.adapters["default"].ia3_l, before)
    layer.load_vector("default", torch.full((16,), 2.0))
    assert layer.adapters["default"].ia3_l.shape == (1, 16)
    with pytest.raises(TypeError, match="nn.Linear"):
        IA3Linear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        IA3Linear(4, 4, backend="gpu")
    with pytest.raises(ValueError, match="last dimension 16"):
        layer(torch.randn(2, 5, device=DEVICE))


def test_fp16_layer(kernel_calls):
    layer = IA3Linear(40, 24, device=DEVICE, dtype=torch.float16, init_ia3_weights=False, is_feedforward=True)
    x = torch.randn(9, 40, device=DEVICE, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16 and kernel_calls
    ref = ia3_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.ia3_vector.double(), True)
    assert rel_err(y, ref) < 5e-3
