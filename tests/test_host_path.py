"""The host path of a forward: launch plans kept per call signature, the lean
no-custom-op eager paths, and the 16-bit copies of fp32 adapters fed to the LoRA shrink.

Each test proves the Triton launcher ran (spies) and checks results against the float64
reference; nothing here is timed (``benchmarks/host_overhead.py`` measures).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, INTERPRETED, ON_GPU
from numerics import TOL, rel_err

import fastpeft as fp
import fastpeft.methods.bottleneck.op as bn_op
import fastpeft.methods.ia3.op as ia3_op
import fastpeft.methods.lora.multi_op as multi_op
import fastpeft.methods.lora.op as lora_op
from fastpeft.kernels import autotune
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels.reference import bottleneck_linear_ref, ia3_linear_ref, lora_linear_ref

pytestmark = pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="the Triton kernels run nowhere here")
F16 = torch.float16


def _d(t):
    return None if t is None else t.detach().double()


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# ------------------------------------------------------------------ launch plans


def test_a_kept_plan_replays_with_new_data_and_strides_get_their_own(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_PLANS", {})
    general = _spy(monkeypatch, lora_kernels, "_lora_linear_fwd")
    K, N, r = 37, 29, 5
    w, bias = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    a, b = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    for step in range(3):  # the first call plans, the others replay it
        x = torch.randn(2, 3, K, device=DEVICE)
        y = lora_kernels.lora_linear_fwd(x, w, bias, a, b, 0.5 + step)
        assert rel_err(y, lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 0.5 + step)) < TOL[torch.float32]
    assert len(general) == 1 and len(lora_kernels._PLANS) == 1
    xt = torch.randn(3, 2, K, device=DEVICE).transpose(0, 1)  # same shape, two row strides
    y = lora_kernels.lora_linear_fwd(xt, w, bias, a, b, 0.5)
    assert len(general) == 2 and len(lora_kernels._PLANS) == 2
    assert rel_err(y, lora_linear_ref(_d(xt), _d(w), _d(bias), _d(a), _d(b), 0.5)) < TOL[torch.float32]
    # A replaced tuner table is a new tuning: the plan is not replayed.
    monkeypatch.setattr(autotune, "TUNED", {})
    lora_kernels.lora_linear_fwd(xt, w, bias, a, b, 0.5)
    assert len(general) == 3


def test_a_strided_bias_is_never_replayed_from_a_plan(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_PLANS", {})
    K, N, r = 16, 12, 3
    w, a, b = torch.randn(N, K, device=DEVICE), torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    bias = torch.randn(N, 2, device=DEVICE)[:, 1]  # stride 2
    for _ in range(2):
        x = torch.randn(4, K, device=DEVICE)
        y = lora_kernels.lora_linear_fwd(x, w, bias, a, b, 2.0)
        assert rel_err(y, lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 2.0)) < TOL[torch.float32]
    assert not lora_kernels._PLANS


# ------------------------------------------------------------------ fp32 adapters, 16-bit copies


HALF_DTYPES = [F16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="bf16 kernels need a GPU"))]


def _half_layer(a_scale: float = 1.0, dtype: torch.dtype = F16) -> fp.FastLoRALinear:
    layer = fp.FastLoRALinear.from_linear(nn.Linear(24, 16, device=DEVICE).to(dtype), r=4, lora_alpha=8,
                                          init_lora_weights=False)
    for p in layer.adapters.parameters():  # PEFT's autocast_adapter_dtype: fp32 adapters
        p.data = p.data.float()
    with torch.no_grad():
        layer.lora_A.mul_(a_scale)
        layer.lora_B.div_(a_scale)
    return layer.eval()


def _ref(layer, x):
    return lora_linear_ref(_d(x), _d(layer.weight), _d(layer.bias), _d(layer.lora_A), _d(layer.lora_B), layer.scaling)


def _copies_passed(calls):
    return [kw.get("lora_A_lowp") for _, kw in calls]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_fp32_adapters_feed_the_shrink_a_kept_16bit_copy_rebuilt_when_A_changes(monkeypatch, dtype):
    layer = _half_layer(dtype=dtype)
    calls = _spy(monkeypatch, lora_kernels, "lora_linear_fwd")
    x = torch.randn(3, 24, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
    first, second = _copies_passed(calls)
    assert first is not None and first.dtype == dtype and second is first  # built once, kept
    assert torch.equal(first, layer.lora_A.detach().to(dtype))
    assert rel_err(y1, _ref(layer, x)) < TOL[dtype] and torch.equal(y1, y2)

    def check_rebuilt(what):
        calls.clear()
        with torch.no_grad():
            y = layer(x)
        (copy,) = _copies_passed(calls)
        assert copy is not first and torch.equal(copy, layer.lora_A.detach().to(dtype)), what
        assert rel_err(y, _ref(layer, x)) < TOL[dtype], what
        return copy

    opt = torch.optim.SGD(layer.adapters.parameters(), lr=0.5)
    layer.lora_A.grad = torch.randn_like(layer.lora_A)
    opt.step()  # in place: the version counter moves
    first = check_rebuilt("optimizer step")
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["adapters.default.lora_A"] = torch.randn(4, 24, device=DEVICE)
    layer.load_state_dict(state)
    first = check_rebuilt("load_state_dict")
    layer.add_adapter("other", 4, 8, init_lora_weights=False)
    layer.adapters["other"].float()
    layer.set_adapter("other")
    check_rebuilt("set_adapter")


def test_a_copy_that_would_overflow_fp16_is_not_used():
    layer = _half_layer(a_scale=1e6)  # A's entries pass fp16's 65504; PEFT's fp32 branch is finite
    assert layer.lora_A.abs().max() > 65504
    x = torch.randn(3, 24, device=DEVICE, dtype=F16)
    with torch.no_grad():
        y = layer(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, _ref(layer, x)) < TOL[F16]
    assert list(layer._lowp_cache.values())[0][2] is None


def test_training_gets_gradients_in_the_fp32_masters_without_copies(monkeypatch):
    layer = _half_layer().train()
    calls = _spy(monkeypatch, lora_kernels, "lora_linear_fwd")
    x = torch.randn(3, 24, device=DEVICE, dtype=F16)
    layer(x).float().sum().backward()
    assert calls and all(c is None for c in _copies_passed(calls))
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    assert not layer._lowp_cache


# ------------------------------------------------------------------ lean eager paths


def _no_op_calls(monkeypatch, module, name):
    """Calls of a custom op (the lean path must skip it)."""
    return _spy(monkeypatch, module, name)


@pytest.mark.parametrize("ff", [False, True])
def test_ia3_decode_skips_the_custom_op(monkeypatch, ff):
    layer = fp.IA3Linear(24, 20, is_feedforward=ff, device=DEVICE, init_ia3_weights=False).eval()
    kernel = _spy(monkeypatch, ia3_op._ia3_kernels, "ia3_linear_fwd")
    op = _no_op_calls(monkeypatch, ia3_op, "_ia3_linear_op")
    x = torch.randn(2, 3, 24, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
    assert len(kernel) == 1 and not op
    l = layer.adapters["default"].ia3_l
    assert rel_err(y, ia3_linear_ref(_d(x), _d(layer.weight), _d(layer.bias), _d(l), ff)) < TOL[torch.float32]
    layer(x).sum().backward()  # with autograd: the custom op
    assert len(op) == 1 and l.grad is not None


def test_bottleneck_decode_skips_the_custom_op_and_keeps_fp32_adapters_cast(monkeypatch):
    layer = fp.BottleneckLinear.from_linear(nn.Linear(24, 16, device=DEVICE).half(), bottleneck_size=8,
                                            init_weights=False)
    layer.adapters.float()  # fp32 adapter on a half base
    layer.eval()
    kernel = _spy(monkeypatch, bn_op._bn_kernels, "bottleneck_linear_fwd")
    op = _no_op_calls(monkeypatch, bn_op, "_bottleneck_linear_op")
    x = torch.randn(3, 24, device=DEVICE, dtype=F16)
    ad = layer.adapters["default"]

    def ref():
        return bottleneck_linear_ref(_d(x), _d(layer.weight), _d(layer.bias), _d(ad.down.weight), _d(ad.down.bias),
                                     _d(ad.up.weight), _d(ad.up.bias), ad.scaling, ad.non_linearity)

    with torch.no_grad():
        y = layer(x)
        kept = layer._cast_cache["default"][2]
        assert rel_err(y, ref()) < TOL[F16]
        layer(x)
        assert layer._cast_cache["default"][2] is kept  # cast once, not per call
        ad.up.weight.mul_(-2.0)  # an in-place change is seen
        y = layer(x)
        assert layer._cast_cache["default"][2] is not kept
    assert len(kernel) == 3 and not op
    assert rel_err(y, ref()) < TOL[F16]


def test_mixed_batch_decode_skips_the_custom_op(monkeypatch):
    layer = fp.FastLoRALinear.from_linear(nn.Linear(24, 16, device=DEVICE), r=4, lora_alpha=8,
                                          init_lora_weights=False)
    layer.add_adapter("b", 2, 4, init_lora_weights=False)
    layer.eval()
    kernel = _spy(monkeypatch, multi_op._kernels, "multi_lora_linear_fwd")
    op = _no_op_calls(monkeypatch, multi_op, "_multi_lora_linear_op")
    x = torch.randn(3, 24, device=DEVICE)
    names = ["b", None, "default"]
    with torch.no_grad(), fp.batch_adapters(nn.Sequential(layer).eval(), names):
        y = layer(x)
    assert len(kernel) == 1 and not op
    for i, name in enumerate(names):
        if name is None:
            want = torch.nn.functional.linear(_d(x[i]), _d(layer.weight), _d(layer.bias))
        else:
            ad = layer.adapters[name]
            want = lora_linear_ref(_d(x[i]), _d(layer.weight), _d(layer.bias), _d(ad.lora_A), _d(ad.lora_B), ad.scaling)
        assert rel_err(y[i], want) < TOL[torch.float32], name


@pytest.mark.parametrize("ff", [False, True])
def test_ia3_plans_replay_with_new_data(monkeypatch, ff):
    from fastpeft.kernels import ia3 as ia3_kernels

    monkeypatch.setattr(ia3_kernels, "_PLANS", {})
    general = _spy(monkeypatch, ia3_kernels, "_launch")
    K, N = 21, 13
    w, bias = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    for step in range(3):
        x, l = torch.randn(2, 5, K, device=DEVICE), torch.randn(K if ff else N, device=DEVICE)
        y = ia3_kernels.ia3_linear_fwd(x, w, bias, l, ff)
        assert rel_err(y, ia3_linear_ref(_d(x), _d(w), _d(bias), _d(l), ff)) < TOL[torch.float32]
    assert len(general) == 1 and len(ia3_kernels._PLANS) == 1
    strided = torch.randn(N, 2, device=DEVICE)[:, 0]
    y = ia3_kernels.ia3_linear_fwd(x, w, strided, l, ff)
    assert rel_err(y, ia3_linear_ref(_d(x), _d(w), _d(strided), _d(l), ff)) < TOL[torch.float32]
    assert len(ia3_kernels._PLANS) == 1  # a strided bias is never planned


_SHRINK_WAITS = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from sm90 import compile_sm90
from fastpeft.kernels import lora
out = {}
for a in sys.argv[2:]:
    ptrs = {p: "bf16" for p in ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "xa_ptr", "y_ptr")}
    ptrs.update(a_ptr=a, b_ptr="fp32", xa_ptr="fp32")
    c = compile_sm90(lora._lora_linear_fwd_kernel, ptr_dtypes=ptrs, constexprs=dict(
        HAS_BIAS=True, HAS_LORA=True, SHRINK_IN_LOOP=True, SPLIT_K=1, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64,
        BLOCK_R=16, GROUP_M=8, LORA_FP32=True, INPUT_PRECISION="ieee"),
        unit_args=["stride_xk", "stride_wk", "stride_ak", "stride_yn"], float_args=["scaling"], num_warps=4,
        num_stages=4)
    loop = c.asm["ttgir"].split("scf.for", 1)[1].split("scf.yield", 1)[0]
    out[a] = {"dots": loop.count("warp_group_dot "),
              "waits": [int(p) for p in re.findall(r"warp_group_dot_wait.*?pendings = (\d+)", loop)]}
print(json.dumps(out))
"""


@pytest.mark.skipif(ON_GPU, reason="compiled ahead of time where no GPU runs the kernels")
def test_a_16bit_copy_of_A_keeps_the_shrink_on_async_wgmma_for_hopper():
    """sm_90 compile of the main loop (bf16 x, fp32 B and xa, LORA_FP32): with the fp32
    A the shrink is eight register-operand tf32 wgmmas each followed by a wait; with a
    bf16 copy of A it is one wgmma and the loop's single wait leaves MMAs in flight."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", _SHRINK_WAITS, tests, "fp32", "bf16"], capture_output=True,
                          text=True, env=dict(os.environ, TRITON_INTERPRET="0"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bf16"]["dots"] == 2 and got["bf16"]["waits"] and min(got["bf16"]["waits"]) >= 1, got
    assert got["fp32"]["dots"] > got["bf16"]["dots"] and len(got["fp32"]["waits"]) > len(got["bf16"]["waits"]), got


def test_lora_bias_is_kept_at_decode_and_follows_changes(monkeypatch):
    layer = fp.FastLoRALinear.wrap(nn.Linear(24, 16, device=DEVICE), r=4, lora_alpha=8, init_lora_weights=False,
                                   lora_bias=True).eval()
    calls = _spy(monkeypatch, lora_kernels, "lora_linear_fwd")
    ad = layer.adapters["default"]
    x = torch.randn(3, 24, device=DEVICE)

    def ref():
        b = _d(layer.bias) + ad.scaling * _d(ad.lora_bias)
        return lora_linear_ref(_d(x), _d(layer.weight), b, _d(ad.lora_A), _d(ad.lora_B), ad.scaling)

    with torch.no_grad():
        y = layer(x)
        layer(x)
        first, second = (args[2] for args, _ in calls)
        assert second is first  # s * lora_bias + b made once
        assert rel_err(y, ref()) < TOL[torch.float32]
        ad.lora_bias.add_(1.0)
        y = layer(x)
        assert calls[-1][0][2] is not first and rel_err(y, ref()) < TOL[torch.float32]
    layer(x).sum().backward()  # with autograd: built in the graph, gradients reach lora_bias
    assert ad.lora_bias.grad is not None
