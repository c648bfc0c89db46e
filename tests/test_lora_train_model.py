"""The LoRA training path at layer and model level: activation memory against PEFT's
layer, gradient checkpointing (the dropout mask redrawn from the restored RNG state), and
``torch.compile`` of a training step without graph breaks."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, INTERPRETED, ON_GPU
from numerics import rel_err
from tiny_models import input_ids, tiny_llama

import fastpeft as fp
import fastpeft.methods.lora.op as ops

pytestmark = pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="needs the Triton kernels")


def saved_activation_bytes(fn, params: Iterable[torch.Tensor]) -> int:
    """Bytes that autograd keeps for the backward of ``fn()`` (each storage once, the
    parameters left out): the benchmarks' own count."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    return common.saved_bytes(fn, params)


def _pair(K: int, N: int, r: int, p: float, dtype: torch.dtype, adapter_dtype: torch.dtype):
    """A PEFT LoRA layer and a FastLoRALinear with the same base and adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(K, N).to(DEVICE, dtype))
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"],
                                                 init_lora_weights=False))
    peft_layer = peft_model.base_model.model.proj
    peft_layer.lora_A["default"].to(adapter_dtype)
    peft_layer.lora_B["default"].to(adapter_dtype)
    ours = fp.FastLoRALinear(K, N, r=r, lora_alpha=2 * r, lora_dropout=p, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.adapters["default"].to(adapter_dtype)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return peft_layer.train(), ours.train()


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)],
                         ids=["fp32", "fp16-fp32adapters"])
def test_saved_bytes_at_most_peft(p, dtype, adapter_dtype):
    """PEFT keeps x, the dropout mask and dropout(x) (and fp32 copies of x for fp32
    adapters on a half model) and x A^T; the fused path keeps x, x A^T and an 8-byte seed."""
    M, K, N, r = 64, 96, 80, 8
    peft_layer, ours = _pair(K, N, r, p, dtype, adapter_dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    theirs = saved_activation_bytes(lambda: peft_layer(x), peft_layer.parameters())
    mine = saved_activation_bytes(lambda: ours(x), ours.parameters())
    print(f"saved bytes per layer: fastpeft {mine}, peft {theirs} (M={M} K={K} r={r} p={p} {dtype})")
    xa_bytes = M * r * (4 if adapter_dtype == torch.float32 else dtype.itemsize)
    assert mine == x.nbytes + xa_bytes + (8 if p > 0 else 0)
    assert mine <= theirs
    if p > 0:  # no copy of the dropped-out input (nor its mask): one x fewer, the seed aside
        assert theirs - (mine - 8) >= x.nbytes


def _loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def test_gradient_checkpointing_same_grads(monkeypatch):
    model = tiny_llama().to(DEVICE)
    fp.inject(model, fp.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights=False))
    for name, prm in model.named_parameters():
        prm.requires_grad_("lora_" in name)
    model.train()
    ids = input_ids(batch=2, seq=5).to(DEVICE)
    loss, grads = _loss_and_grads(model, ids, seed=11)
    shrinks = []
    real = ops._train_kernels.lora_dropout_shrink
    monkeypatch.setattr(ops._train_kernels, "lora_dropout_shrink", lambda *a, **k: shrinks.append(1) or real(*a, **k))
    model.gradient_checkpointing_enable()  # transformers 5: non-reentrant by default
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, seed=11)
    assert len(shrinks) == 2 * 4  # 4 LoRA layers, each forward run again in the backward
    assert rel_err(loss_ckpt, loss) <= 1e-6  # (fp32 atomics on a GPU: not bitwise)
    for g, gc in zip(grads, grads_ckpt):
        assert rel_err(gc, g) <= 1e-6
    _, grads_other_seed = _loss_and_grads(model, ids, seed=12)
    assert rel_err(grads_other_seed[0], grads[0]) > 1e-3  # the mask matters: the test can fail


def test_compiled_training_step_no_graph_breaks_same_grads():
    torch._dynamo.reset()
    layer = fp.FastLoRALinear(24, 16, r=4, lora_alpha=8, lora_dropout=0.25, init_lora_weights=False,
                              device=DEVICE).train()
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B]

    def step(module):
        torch.manual_seed(3)
        return torch.autograd.grad(module(x).square().sum(), params)

    eager = step(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    try:
        got = step(compiled)
    finally:
        torch._dynamo.reset()
    for g, e in zip(got, eager):
        assert rel_err(g, e) <= 1e-6
