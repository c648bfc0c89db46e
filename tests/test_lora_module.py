"""FastLoRALinear: the DESIGN.md contract, training behaviour, merge, torch.compile."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE, INTERPRETED, KERNEL_DTYPES, ON_GPU
from numerics import assert_matches_ref, rel_err

import fastpeft as fp
import fastpeft.methods.lora.op as ops
from fastpeft.kernels.reference import lora_linear_ref


def _layer(K=37, N=29, r=4, dtype=torch.float32, **kw) -> fp.FastLoRALinear:
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)  # non-trivial B, so the adapter matters
    return fp.FastLoRALinear(K, N, r=r, device=DEVICE, dtype=dtype, **kw)


def _ref64(layer: fp.FastLoRALinear, x: torch.Tensor, x_lora=None) -> torch.Tensor:
    b = None if layer.bias is None else layer.bias.double()
    xl = None if x_lora is None else x_lora.double()
    return lora_linear_ref(x.double(), layer.weight.double(), b, layer.lora_A.double(),
                           layer.lora_B.double(), layer.scaling, xl)


# Under the interpreter (and on a GPU) the layer's "auto" backend is the Triton kernel:
# the tests below that take the ``launches`` fixture prove it ran.
TRITON_RUNS = INTERPRETED or ON_GPU


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The LoRA branch's input as a training forward run right after
    ``torch.manual_seed(seed)`` drops it: the kernels' mask drawn from the seed the layer
    takes from torch's RNG, or PyTorch's dropout on the reference backend."""
    torch.manual_seed(seed)
    if not TRITON_RUNS:
        return F.dropout(x, p, training=True)
    from fastpeft.kernels.dropout import dropout_mask

    keep = dropout_mask(ops.dropout_seed(x.device), x.numel() // x.shape[-1], x.shape[-1], p)
    return x * keep.reshape(x.shape).to(x.dtype) / (1 - p)


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the fused forward kernel (the input gradient runs it too)."""
    calls = []
    real = ops._kernels.lora_linear_fwd
    monkeypatch.setattr(ops._kernels, "lora_linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield calls
    if TRITON_RUNS:
        assert calls, "the Triton kernel never ran"


def test_auto_backend_is_triton_where_triton_runs():
    want = "triton" if TRITON_RUNS else "torch"
    assert fp.resolve_backend("auto", torch.device(DEVICE)) == want
    assert fp.resolve_backend("auto", torch.device(DEVICE), torch.float64) == "torch"  # as nn.Linear, in fp64
    with pytest.raises(TypeError, match="runs fp32, fp16 and bf16"):
        fp.resolve_backend("triton", torch.device(DEVICE), torch.float64)


def test_contract_attributes():
    layer = fp.FastLoRALinear(20, 12, r=8, lora_alpha=16, lora_dropout=0.0, bias=True, use_rslora=False)
    assert layer.lora_A.shape == (8, 20) and layer.lora_B.shape == (12, 8)
    assert layer.weight.shape == (12, 20) and layer.bias.shape == (12,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 2.0 and layer.merged is False
    assert fp.FastLoRALinear(20, 12, r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))


def test_fresh_layer_equals_its_base():
    """PEFT init: A kaiming-uniform (non-zero), B zeros, so the update is exactly 0."""
    layer = fp.FastLoRALinear(33, 21, r=8, device=DEVICE)
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0
    bound = 1 / math.sqrt(33)  # kaiming_uniform(a=sqrt(5)) on fan_in 33
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(7, 33, device=DEVICE)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_gaussian_init():
    layer = fp.FastLoRALinear(400, 30, r=16, init_lora_weights="gaussian")
    assert layer.lora_B.abs().sum() == 0
    assert layer.lora_A.std().item() == pytest.approx(1 / 16, rel=0.1)


def test_from_linear_leaves_the_source_module_alone():
    """The layer shares the source's storage but not its Parameter objects: casting or
    moving the layer does not convert the user's own (frozen) Linear."""
    lin = nn.Linear(24, 18).requires_grad_(False)
    layer = fp.FastLoRALinear.from_linear(lin, r=4, lora_alpha=np.int64(16))
    assert layer.weight is not lin.weight and layer.weight.data_ptr() == lin.weight.data_ptr()
    layer.half()
    assert lin.weight.dtype == torch.float32 and lin(torch.randn(2, 24)).dtype == torch.float32


def test_from_linear_wraps_without_copy():
    lin = nn.Linear(24, 18)
    layer = fp.FastLoRALinear.from_linear(lin, r=4, lora_alpha=16)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.bias.data_ptr() == lin.bias.data_ptr()
    assert layer.scaling == 4.0 and not layer.weight.requires_grad
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), lin(x))
    no_bias = fp.FastLoRALinear.from_linear(nn.Linear(24, 18, bias=False), r=2)
    assert no_bias.bias is None


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_reference(dtype, bias, use_rslora, launches):
    layer = _layer(dtype=dtype, bias=bias, use_rslora=use_rslora).eval()
    x = torch.randn(2, 5, 37, device=DEVICE, dtype=dtype)
    y = layer(x)
    same = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert_matches_ref(y, _ref64(layer, x), same, dtype)


def test_triton_and_torch_backends_agree(monkeypatch):
    calls = []
    real = ops._kernels.lora_linear_fwd
    monkeypatch.setattr(ops._kernels, "lora_linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    tri = _layer(backend="triton").eval()
    ref = _layer(backend="torch").eval()
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(9, 37, device=DEVICE)
    y_tri = tri(x)
    assert len(calls) == 1
    y_ref = ref(x)
    assert len(calls) == 1
    assert rel_err(y_tri, y_ref) < 1e-5


def test_dropout_only_in_training(launches):
    layer = _layer(lora_dropout=0.5)
    x = torch.randn(6, 37, device=DEVICE)
    layer.train()
    torch.manual_seed(123)
    y_train = layer(x)
    x_lora = _dropped(x, 0.5, 123)
    assert rel_err(y_train, _ref64(layer, x, x_lora)) < 1e-5
    assert rel_err(y_train, _ref64(layer, x)) > 1e-3  # the branch input really was dropped
    layer.eval()
    assert rel_err(layer(x), _ref64(layer, x)) < 1e-5


def test_dropout_gradients_flow_through_mask(launches):
    layer = _layer(lora_dropout=0.25).train()
    x = torch.randn(5, 37, device=DEVICE, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    g = torch.randn_like(y)
    gx, ga, gb = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A.detach().double().requires_grad_()
    b64 = layer.lora_B.detach().double().requires_grad_()
    xl64 = _dropped(x64, 0.25, 7)
    ref = lora_linear_ref(x64, layer.weight.double(), layer.bias.double(), a64, b64, layer.scaling, xl64)
    wx, wa, wb = torch.autograd.grad(ref, [x64, a64, b64], g.double())
    for got, want in ((gx, wx), (ga, wa), (gb, wb)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_gradients_of_adapter_and_input(dtype, launches):
    layer = _layer(dtype=dtype)
    x = torch.randn(3, 4, 37, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    assert layer.weight.grad is None and layer.bias.grad is None
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A.detach().double().requires_grad_()
    b64 = layer.lora_B.detach().double().requires_grad_()
    ref = lora_linear_ref(x64, layer.weight.double(), layer.bias.double(), a64, b64, layer.scaling)
    ref.backward(g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        assert got.dtype == dtype and rel_err(got, want) < tol


def test_merge_unmerge_round_trip(launches):
    layer = _layer().eval()
    x = torch.randn(8, 37, device=DEVICE)
    w0 = layer.weight.detach().clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), y0) < 1e-6
    torch.testing.assert_close(layer.weight, w0 + layer.scaling * layer.lora_B @ layer.lora_A)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    assert rel_err(layer(x), y0) < 1e-6


def test_merge_twice_is_idempotent():
    layer = _layer()
    w0 = layer.weight.detach().clone()
    layer.merge()
    w1 = layer.weight.detach().clone()
    layer.merge()  # already merged: nothing more is added
    assert torch.equal(layer.weight, w1) and layer.merged_adapters == ["default"]
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)


def test_adapters_are_independent():
    layer = _layer()
    layer.add_adapter("other", r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(4, 37, device=DEVICE)
    y_default = layer(x)
    layer.set_adapter("other")
    assert layer.lora_A.shape == (2, 37) and layer.scaling == 2.0
    assert rel_err(layer(x), _ref64(layer, x)) < 1e-5
    assert rel_err(layer(x), y_default) > 1e-3
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(KeyError, match="nope"):
        layer.set_adapter("nope")
    layer.set_adapter("other")
    layer.delete_adapter("other")
    assert layer.active_adapter == "default"


# ------------------------------------------------------------------ error paths


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_invalid_rank(r):
    with pytest.raises(ValueError, match="rank"):
        fp.FastLoRALinear(8, 8, r=r)
    with pytest.raises(ValueError, match="rank"):
        fp.FastLoRALinear.from_linear(nn.Linear(8, 8), r=r)


def test_bad_input_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="last dimension 37"):
        layer(torch.randn(3, 36))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 37, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="is on"):
        layer(torch.empty(3, 37, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        _layer(backend="gpu")
    with pytest.raises(ValueError, match="lora_dropout"):
        _layer(lora_dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        fp.FastLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


# ------------------------------------------------------------------ torch.compile


def _tiny_model() -> nn.Module:
    return nn.Sequential(
        fp.FastLoRALinear(24, 32, r=4, init_lora_weights=False),
        nn.GELU(),
        fp.FastLoRALinear(32, 16, r=8, init_lora_weights=False),
    )


def test_compile_has_no_graph_breaks():
    model = _tiny_model().eval()
    explanation = torch._dynamo.explain(model)(torch.randn(5, 24))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compiled_forward_and_backward_match_eager():
    """aot_eager traces the custom op's fake kernel and autograd formula."""
    torch._dynamo.reset()
    model = _tiny_model().train()
    x = torch.randn(6, 24)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert rel_err(out, eager) < 1e-6
    for got, want in zip([p.grad for p in model.parameters() if p.requires_grad], grads):
        assert rel_err(got, want) < 1e-6
