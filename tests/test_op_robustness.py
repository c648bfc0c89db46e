"""Inputs the kernels must not take at face value: strided vectors, bad biases, and
torch.autocast, for the LoRA, (IA)^3, bottleneck and mixed-adapter ops and layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from numerics import rel_err

import fastpeft as fp
import fastpeft.methods.lora.op as ops
import fastpeft.methods.lora.multi_op as ops_multi
from fastpeft.kernels.reference import lora_linear_ref, multi_lora_linear_ref

M, K, N, R = 5, 48, 40, 8


def _operands(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    a = (torch.randn(R, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = (torch.randn(N, R, generator=g) / R**0.5).to(DEVICE, dtype)
    return x, w, a, b


def test_strided_bias_is_read_by_its_stride(monkeypatch):
    x, w, a, b = _operands()
    bias = torch.randn(2 * N, device=DEVICE)[::2]  # a view with stride 2
    calls = []
    real = ops._kernels.lora_linear_fwd
    monkeypatch.setattr(ops._kernels, "lora_linear_fwd", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    y = fp.lora_linear(x, w, bias, a, b, 0.5, backend="triton")
    assert calls
    assert rel_err(y, lora_linear_ref(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)) < 1e-6


def test_strided_bias_ranks_and_scalings_in_mixed_batches():
    x, w, _, _ = _operands()
    S = 2
    A = torch.randn(S, R, K, device=DEVICE) / K**0.5
    B = torch.randn(S, N, R, device=DEVICE) / R**0.5
    bias = torch.randn(2 * N, device=DEVICE)[::2]
    ranks = torch.tensor([8, 0, 4, 0], dtype=torch.int32, device=DEVICE)[::2]
    scalings = torch.tensor([0.5, 9.0, 2.0, 9.0], device=DEVICE)[::2]
    slots = torch.tensor([0, -1, 1, 1, 0], dtype=torch.int32, device=DEVICE)
    y = ops_multi.multi_lora_linear(x, w, bias, A, B, ranks, scalings, slots, backend="triton")
    d = lambda t: t.double()  # noqa: E731
    ref = multi_lora_linear_ref(d(x), d(w), d(bias), d(A), d(B), ranks.contiguous(), d(scalings), slots)
    assert rel_err(y, ref) < 1e-6


@pytest.mark.parametrize(
    "bias,exc,match",
    [
        (torch.randn(8), ValueError, r"bias must be a floating tensor of shape \(40,\)"),
        (torch.randn(N, 1), ValueError, "bias must be"),
        (torch.arange(N), ValueError, "bias must be a floating"),
    ],
)
def test_bad_bias_raises_before_any_kernel(bias, exc, match):
    x, w, a, b = _operands()
    with pytest.raises(exc, match=match):
        fp.lora_linear(x, w, bias.to(DEVICE), a, b, 1.0, backend="triton")


# torch.autocast on the CPU runs fp16 here (the interpreter has no bf16 dot).
AMP = torch.float16


def _amp():
    return torch.autocast(device_type=torch.device(DEVICE).type, dtype=AMP)


def test_lora_layer_under_autocast_runs_in_its_dtype_like_nn_linear():
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=DEVICE)
    layer = fp.FastLoRALinear.from_linear(base, r=R, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(3, M, K, device=DEVICE, requires_grad=True)
    with _amp():
        y = layer(x)
        expect_dtype = base(x).dtype
    assert y.dtype == expect_dtype == AMP
    h = lambda t: t.detach().to(AMP).double()  # noqa: E731
    ref = lora_linear_ref(h(x), h(layer.weight), h(layer.bias), h(layer.lora_A), h(layer.lora_B), layer.scaling)
    assert rel_err(y, ref) < 5e-3
    y.float().square().sum().backward()  # gradients reach the fp32 master weights
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    assert x.grad.dtype == torch.float32


def test_mixed_batch_under_autocast():
    torch.manual_seed(0)
    layer = fp.FastLoRALinear.from_linear(nn.Linear(K, N, device=DEVICE), r=4, init_lora_weights=False)
    layer.add_adapter("b", 8, 8, init_lora_weights=False)
    layer.eval().row_adapters = ["b", None, "default"]
    x = torch.randn(3, M, K, device=DEVICE)
    with torch.no_grad(), _amp():
        y = layer(x)
    layer.row_adapters = None
    assert y.dtype == AMP
    for row, name in enumerate(["b", None, "default"]):
        layer.set_adapter(name)
        with torch.no_grad(), _amp():
            assert rel_err(y[row], layer(x[row : row + 1])[0]) < 5e-3


def test_ia3_and_bottleneck_layers_under_autocast():
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    ia3 = fp.IA3Linear.from_linear(base, is_feedforward=True, init_ia3_weights=False)
    bn = fp.BottleneckLinear.from_linear(base, bottleneck_size=16, non_linearity="gelu")
    torch.nn.init.normal_(bn.adapters["default"].up.weight, std=0.1)
    for layer in (ia3, bn):
        with torch.no_grad():
            full = layer(x)
            with _amp():
                low = layer(x)
        assert low.dtype == AMP and rel_err(low, full) < 5e-3, type(layer).__name__
