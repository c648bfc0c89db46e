"""Wrong numbers found by adversarial testing, kept fixed, at the op level (every kernel
path) and through a model:

1. fp32 adapters on an fp16 input: ``x A^T`` keeps fp32 range, as in PEFT's fp32 branch
   (rounding it to fp16 overflowed where PEFT and the reference do not);
2. bf16 under the Triton interpreter (whose ``tl.dot`` has no bf16): ``auto`` runs the
   reference, forcing ``triton`` raises;
3. inputs holding inf/NaN: outputs have the reference's inf/NaN pattern (padded rank
   lanes held ``inf * 0 = NaN`` and spread it over the row).

The reference is PEFT's unfused computation (``fastpeft.kernels.reference``, PEFT
itself through a model).
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, INTERPRETED
from numerics import TOL, assert_matches_ref, rel_err

import fastpeft as fp
import fastpeft.methods.bottleneck.op as bottleneck_op
import fastpeft.methods.ia3.op as ia3_op
import fastpeft.methods.lora.multi_op as ops_multi
import fastpeft.methods.lora.op as ops
from fastpeft.kernels import bottleneck as bn_kernels
from fastpeft.kernels import ia3 as ia3_kernels
from fastpeft.kernels import lora as lora_kernels
from fastpeft.kernels import multi_lora as ml
from fastpeft.kernels.autotune import LIBRARY_GEMM, KernelConfig
from fastpeft.kernels.multi_lora_meta import MultiLoraLaunch
from fastpeft.kernels.reference import (
    bottleneck_linear_ref,
    ia3_linear_ref,
    lora_linear_ref,
    multi_lora_linear_ref,
)

Config = KernelConfig
F16 = torch.float16


def _d(t):
    return None if t is None else t.double()


@pytest.fixture
def launches(monkeypatch):
    """Count launches of the LoRA and mixed-adapter launchers: proof the kernels ran."""
    calls = []
    for mod, name in ((lora_kernels, "lora_linear_fwd"), (ml, "multi_lora_linear_fwd")):
        real = getattr(mod, name)

        def spy(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    return calls


# ======================================================= 1. fp32 adapters, fp16 input

# Forced launch configs for every way the LoRA branch reaches the output tile:
# in-loop shrink, precomputed xa, split-K (in-loop and precomputed), persistent TMA.
LORA_CONFIGS = {
    "loop": Config(16, 32, 16, num_warps=1, num_stages=1),
    "pre": Config(16, 32, 16, num_warps=1, num_stages=1, precompute_xa=True),
    "splitk-loop": Config(16, 32, 16, num_warps=1, num_stages=1, split_k=2),
    "splitk-pre": Config(16, 32, 16, num_warps=1, num_stages=1, split_k=2, precompute_xa=True),
    "tma-loop": Config(16, 32, 16, num_warps=1, num_stages=1, tma=True),
    "tma-pre": Config(16, 32, 16, num_warps=1, num_stages=1, tma=True, precompute_xa=True),
}


def _overflow_case(x_value: float, a_scale: float, r: int = 2, K: int = 32, N: int = 8):
    """The issue's repro: a zero fp16 base, fp32 A = a_scale, B = 0.02 / (r a_scale)
    (0.01 / a_scale at r = 2), x = x_value: ``x A^T = K x_value a_scale`` passes fp16's
    65504, ``y = 0.02 s K x_value`` does not."""
    x = torch.full((3, K), x_value, device=DEVICE, dtype=F16)
    x[1] *= -1  # a negative row too
    w = torch.zeros(N, K, device=DEVICE, dtype=F16)
    a = torch.full((r, K), a_scale, device=DEVICE)
    b = torch.full((N, r), 0.02 / (r * a_scale), device=DEVICE)
    return x, w, a, b


# (x value, A scale): the issue's repro, its rescaled twin near fp16's limit, and an A
# whose entries themselves pass fp16's range (PEFT's fp32 branch computes all of them).
OVERFLOW_CASES = [(1e4, 1.0), (6e4, 8.0), (1.0, 1e5)]


@pytest.mark.parametrize("x_value,a_scale", OVERFLOW_CASES)
@pytest.mark.parametrize("path", ["auto", "dropout", "rank>64"])
def test_fp32_adapters_on_fp16_do_not_overflow_op(x_value, a_scale, path, launches):
    r = 80 if path == "rank>64" else 2
    x, w, a, b = _overflow_case(x_value, a_scale, r=r)
    x_lora = x.clone() if path == "dropout" else None
    y = ops.lora_linear(x, w, None, a, b, 0.5, x_lora=x_lora, backend="triton")
    assert launches, "the Triton launcher did not run"
    ref = lora_linear_ref(x, w, None, a, b, 0.5, x_lora)  # PEFT's computation, fp32 branch
    assert torch.isfinite(ref).all()
    assert torch.isfinite(y).all(), "the fused path overflowed where PEFT's fp32 branch does not"
    assert rel_err(y, lora_linear_ref(_d(x), _d(w), None, _d(a), _d(b), 0.5)) < TOL[F16]


@pytest.mark.parametrize("x_value,a_scale", OVERFLOW_CASES)
@pytest.mark.parametrize("cfg", list(LORA_CONFIGS.values()), ids=list(LORA_CONFIGS))
def test_fp32_adapters_on_fp16_do_not_overflow_any_kernel_variant(x_value, a_scale, cfg):
    x, w, a, b = _overflow_case(x_value, a_scale)
    y = torch.full((3, 8), float("nan"), device=DEVICE, dtype=F16)
    lora_kernels.lora_linear_fwd(x, w, None, a, b, 0.5, config=cfg, out=y)
    assert torch.isfinite(y).all()
    assert rel_err(y, lora_linear_ref(_d(x), _d(w), None, _d(a), _d(b), 0.5)) < TOL[F16]


MULTI_LAUNCHES = {
    f"{'fused' if f else 'split'}-{'gather' if g else 'segments'}-k{k}": MultiLoraLaunch(fuse_base=f, gather=g, split_k=k)
    for f in (True, False) for g in (True, False) for k in (1, 2)
}


@pytest.mark.parametrize("x_value,a_scale", OVERFLOW_CASES)
@pytest.mark.parametrize("launch", list(MULTI_LAUNCHES.values()), ids=list(MULTI_LAUNCHES))
def test_fp32_adapters_on_fp16_do_not_overflow_mixed_batches(x_value, a_scale, launch):
    x, w, a, b = _overflow_case(x_value, a_scale)
    A = torch.stack([a, 2 * a])
    B = torch.stack([b, b])
    ranks = torch.tensor([2, 1], device=DEVICE, dtype=torch.int32)
    scal = torch.tensor([0.5, 1.0], device=DEVICE)
    slots = torch.tensor([0, 1, -1], device=DEVICE, dtype=torch.int32)
    meta = ops_multi.build_meta(slots, 2)
    y = torch.full((3, 8), float("nan"), device=DEVICE, dtype=F16)
    ml.multi_lora_linear_fwd(x, w, None, A, B, ranks, scal, meta, launch=launch, out=y)
    assert torch.isfinite(y).all()
    ref = multi_lora_linear_ref(_d(x), _d(w), None, _d(A), _d(B), ranks, _d(scal), slots)
    assert rel_err(y, ref) < TOL[F16]


def test_fp32_adapters_on_fp16_keep_the_error_bound_on_ordinary_inputs(launches):
    """Random data: the fp32 branch is no less accurate than the 16-bit one was, for
    every variant (kernel vs float64 within 2x PyTorch's own fp16 error)."""
    M, K, N, r = 37, 48, 40, 5
    x = torch.randn(M, K, device=DEVICE, dtype=F16)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(F16)
    bias = torch.randn(N, device=DEVICE, dtype=F16)
    a = torch.randn(r, K, device=DEVICE) / K**0.5
    b = torch.randn(N, r, device=DEVICE) / r**0.5
    ref = lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 0.7)
    same = lora_linear_ref(x, w, bias, a, b, 0.7)
    for cfg in LORA_CONFIGS.values():
        assert_matches_ref(lora_kernels.lora_linear_fwd(x, w, bias, a, b, 0.7, config=cfg), ref, same, F16)
    assert_matches_ref(ops.lora_linear(x, w, bias, a, b, 0.7, backend="triton"), ref, same, F16)
    A, B = a[None], b[None]
    slots = torch.zeros(M, device=DEVICE, dtype=torch.int32)
    ranks, scal = torch.tensor([r], dtype=torch.int32), torch.tensor([0.7])
    for launch in MULTI_LAUNCHES.values():
        y = ml.multi_lora_linear_fwd(x, w, bias, A, B, ranks.to(DEVICE), scal.to(DEVICE),
                                     ops_multi.build_meta(slots, 1), launch=launch)
        assert_matches_ref(y, ref, same, F16)


def test_fp32_adapter_gradients_on_fp16_do_not_overflow(launches):
    """dx = g W + s (g B) A through the fused kernel: ``g B`` passes fp16's range (upstream
    gradient 1e4, ``B`` = 1), ``dx`` does not; PEFT's autograd (fp32 branch) is finite."""
    M, K, N, r = 3, 16, 8, 2
    x = torch.ones(M, K, device=DEVICE, dtype=F16, requires_grad=True)
    w = torch.zeros(N, K, device=DEVICE, dtype=F16)
    a = torch.full((r, K), 0.01, device=DEVICE, requires_grad=True)
    b = torch.ones(N, r, device=DEVICE, requires_grad=True)
    g = torch.full((M, N), 1e4, device=DEVICE, dtype=F16)
    y = ops.lora_linear(x, w, None, a, b, 0.5, backend="triton")
    launched = len(launches)
    got = torch.autograd.grad(y, [x, a, b], g)
    assert len(launches) == launched + 1, "the input gradient did not run the fused kernel"
    # PEFT's autograd: the branch in fp32, its sum with the base in fp32, cast to fp16.
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    theirs = torch.autograd.grad(lora_linear_ref(leaves[0], w, None, leaves[1], leaves[2], 0.5), leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b)]
    exact = torch.autograd.grad(lora_linear_ref(leaves64[0], _d(w), None, leaves64[1], leaves64[2], 0.5),
                                leaves64, g.double())
    for name, mine, peft_grad, want in zip(("dx", "dA", "dB"), got, theirs, exact):
        assert torch.isfinite(peft_grad).all()
        assert torch.isfinite(mine).all(), f"{name} overflowed"
        assert rel_err(mine, want) < TOL[F16], name


# ======================================================= 2. bf16 under the interpreter

interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="bf16 runs the kernels on a GPU")
BF16 = torch.bfloat16


def _bf16_operands(M=5, K=24, N=16, r=3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(N, generator=g)
    a = torch.randn(r, K, generator=g) / K**0.5
    b = torch.randn(N, r, generator=g) / r**0.5
    return [t.to(DEVICE, BF16) for t in (x, w, bias, a, b)]


def _ops_bf16():
    """Each op on bf16 operands: ``{name: (call(backend), float64 reference)}``."""
    x, w, bias, a, b = _bf16_operands()
    N, K = w.shape
    A, B = torch.stack([a, a]), torch.stack([b, -b])
    ranks, scal = torch.tensor([3, 2], dtype=torch.int32), torch.tensor([0.5, 2.0])
    slots = torch.tensor([0, -1, 1, 1, 0], dtype=torch.int32)
    l_out, l_in = torch.rand(N).to(BF16) + 0.5, torch.rand(K).to(BF16) + 0.5
    dw, uw = (torch.randn(4, N) / N**0.5).to(BF16), (torch.randn(N, 4) / 2).to(BF16)
    db, ub = torch.randn(4).to(BF16), torch.randn(N).to(BF16)
    return {
        "lora": (lambda be: ops.lora_linear(x, w, bias, a, b, 0.5, backend=be),
                 lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 0.5)),
        "lora-dropout": (lambda be: ops.lora_linear(x, w, bias, a, b, 0.5, x_lora=x * 2, backend=be),
                         lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 0.5, _d(x) * 2)),
        "multi_lora": (lambda be: ops_multi.multi_lora_linear(x, w, bias, A, B, ranks, scal, slots, backend=be),
                       multi_lora_linear_ref(_d(x), _d(w), _d(bias), _d(A), _d(B), ranks, _d(scal), slots)),
        "ia3-output": (lambda be: ia3_op.ia3_linear(x, w, bias, l_out, False, backend=be),
                       ia3_linear_ref(_d(x), _d(w), _d(bias), _d(l_out), False)),
        "ia3-input": (lambda be: ia3_op.ia3_linear(x, w, bias, l_in, True, backend=be),
                      ia3_linear_ref(_d(x), _d(w), _d(bias), _d(l_in), True)),
        "bottleneck": (lambda be: bottleneck_op.bottleneck_linear(x, w, bias, dw, db, uw, ub, 0.5, "gelu", backend=be),
                       bottleneck_linear_ref(_d(x), _d(w), _d(bias), _d(dw), _d(db), _d(uw), _d(ub), 0.5, "gelu")),
    }


BF16_OPS = ["lora", "lora-dropout", "multi_lora", "ia3-output", "ia3-input", "bottleneck"]


@interpreter_only
def test_auto_never_sends_bf16_to_the_interpreter():
    for device in ("cpu", DEVICE):
        assert ops.resolve_backend("auto", torch.device(device), BF16) == "torch"
    assert ops.resolve_backend("auto", torch.device("cpu"), F16) == "triton"
    with pytest.raises(RuntimeError, match="bfloat16 under the Triton interpreter"):
        ops.resolve_backend("triton", torch.device("cpu"), BF16)


@interpreter_only
@pytest.mark.parametrize("op", BF16_OPS)
def test_bf16_auto_runs_the_reference_and_triton_refuses(op, monkeypatch):
    calls = []
    for mod, name in ((lora_kernels, "lora_linear_fwd"), (ml, "multi_lora_linear_fwd"),
                      (ia3_kernels, "ia3_linear_fwd"), (bn_kernels, "bottleneck_linear_fwd")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: calls.append(_n))
    run, ref = _ops_bf16()[op]
    y = run("auto")
    assert not calls, f"auto sent bf16 to the interpreted kernel ({calls})"
    assert y.dtype == BF16 and rel_err(y, ref) < TOL[BF16]
    assert torch.equal(y, run("torch"))
    with pytest.raises(RuntimeError, match="bfloat16 under the Triton interpreter"):
        run("triton")
    assert not calls


@interpreter_only
def test_bf16_kernel_launchers_refuse_under_the_interpreter():
    x, w, bias, a, b = _bf16_operands()
    meta = ops_multi.build_meta(torch.zeros(5, dtype=torch.int32), 1)
    one = torch.ones(1, dtype=torch.int32)
    calls = {
        "lora": lambda: lora_kernels.lora_linear_fwd(x, w, bias, a, b, 0.5),
        "multi": lambda: ml.multi_lora_linear_fwd(x, w, bias, a[None], b[None], 3 * one, one.float(), meta),
        "ia3": lambda: ia3_kernels.ia3_linear_fwd(x, w, bias, torch.ones(16, dtype=BF16), False),
        "bottleneck": lambda: bn_kernels.bottleneck_linear_fwd(x, w, bias, b.t(), None, b, None, 1.0, "relu"),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="bfloat16 under the Triton interpreter"):
            call()


@interpreter_only
@pytest.mark.parametrize("fp32_adapters", [False, True])
def test_bf16_module_and_model_match_peft_under_the_interpreter(tmp_path, fp32_adapters):
    peft = pytest.importorskip("peft")
    from tiny_models import input_ids, logits, tiny_llama

    x, w, bias, a, b = _bf16_operands()
    layer = fp.FastLoRALinear(w.shape[1], w.shape[0], r=3, lora_alpha=6, dtype=BF16, device=DEVICE)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(bias)
        layer.adapters["default"].lora_A.copy_(a)
        layer.adapters["default"].lora_B.copy_(b)
    ref = lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 2.0)
    assert rel_err(layer(x), ref) < TOL[BF16]

    made = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                             init_lora_weights=False))
    made.save_pretrained(tmp_path)
    ids = input_ids()
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(BF16), tmp_path, autocast_adapter_dtype=fp32_adapters)
    ours = fp.load_adapter(tiny_llama().to(BF16), tmp_path, autocast_adapter_dtype=fp32_adapters)
    lora_dtype = torch.float32 if fp32_adapters else BF16
    assert all(p.dtype == lora_dtype for n, p in ours.named_parameters() if "lora_" in n)
    assert rel_err(logits(ours, ids), logits(theirs, ids)) < 2e-2


# ======================================================= 1. through a model

def _scaled_peft_adapter(path, a_scale: float):
    """A PEFT adapter (tiny Llama, fp32) whose A is multiplied by ``a_scale`` and B divided
    by it: the same update, but ``x A^T`` past fp16's range."""
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_llama

    made = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                             init_lora_weights=False))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_A" in name:
                p.mul_(a_scale)
            elif "lora_B" in name:
                p.div_(a_scale)
    made.save_pretrained(path)
    return peft


@pytest.mark.parametrize("a_scale", [1e5])
def test_fp16_model_with_fp32_adapters_matches_peft(tmp_path, a_scale, launches):
    from tiny_models import input_ids, logits, tiny_llama

    peft = _scaled_peft_adapter(tmp_path, a_scale)
    ids = input_ids().to(DEVICE)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().to(DEVICE, F16), tmp_path)
    want = logits(theirs, ids)
    assert torch.isfinite(want).all()

    ours = fp.load_adapter(tiny_llama().to(DEVICE, F16), tmp_path)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    got = logits(ours, ids)
    assert launches, "the Triton kernels did not run"
    assert torch.isfinite(got).all(), "the fused path overflowed where PEFT's fp32 branch does not"
    assert rel_err(got, want) < 3e-3

    # inject, then the same weights copied in: the same numbers.
    injected = fp.inject(tiny_llama().to(DEVICE, F16), fp.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    injected.load_state_dict(ours.state_dict())
    assert all(p.dtype == torch.float32 for n, p in injected.named_parameters() if "lora_" in n)
    assert torch.equal(logits(injected, ids), got)

    # Mixed batches (the mixed-adapter kernel) against PEFT's adapter_names.
    rows = ["default", None, "default"]
    with torch.no_grad():
        mixed_want = theirs(input_ids=ids, adapter_names=["__base__" if r is None else r for r in rows]).logits
    launched = len(launches)
    with fp.batch_adapters(ours, rows):
        mixed = logits(ours, ids)
    assert len(launches) > launched
    assert torch.isfinite(mixed).all()
    assert rel_err(mixed, mixed_want) < 3e-3


# ======================================================= 3. non-finite inputs

def _nonfinite_rows(M: int, K: int, dtype) -> torch.Tensor:
    """Rows: finite; one +inf; one -inf; one NaN; all +inf; +inf in the last column (a
    partial K tile); finite."""
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    x[1, 3] = float("inf")
    x[2, K // 2] = float("-inf")
    x[3, 5] = float("nan")
    x[4] = float("inf")
    x[5, K - 1] = float("inf")
    return x


def _weights(shape, dtype, positive: bool, scale: float = 1.0) -> torch.Tensor:
    """Positive weights keep an inf input's row inf (no inf - inf); mixed signs make NaN."""
    t = torch.randn(*shape, device=DEVICE) * scale
    return (t.abs() if positive else t).to(dtype)


def assert_same_nonfinite_pattern(out: torch.Tensor, ref: torch.Tensor) -> None:
    """inf/NaN where the reference has them, row by row; finite entries close."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    for m in range(ref.shape[0]):
        assert torch.equal(torch.isnan(out[m]), torch.isnan(ref[m])), f"row {m}: NaN pattern {out[m]} vs {ref[m]}"
        assert torch.equal(torch.isinf(out[m]), torch.isinf(ref[m])), f"row {m}: inf pattern {out[m]} vs {ref[m]}"
        assert torch.equal(out[m][torch.isinf(ref[m])], ref[m][torch.isinf(ref[m])]), f"row {m}: inf signs"
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < 1e-2


NONFINITE_DTYPES = [torch.float32, F16]
SIGNS = pytest.mark.parametrize("positive", [True, False], ids=["positive", "mixed"])


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES)
@SIGNS
@pytest.mark.parametrize("variant", ["auto", "dropout", "rank>64", *LORA_CONFIGS])
def test_lora_nonfinite_inputs_match_the_reference(dtype, positive, variant):
    M, K, N = 7, 48, 24
    r = 80 if variant == "rank>64" else 3  # rank 3: BLOCK_R pads the rank lanes
    x = _nonfinite_rows(M, K, dtype)
    w = _weights((N, K), dtype, positive, K**-0.5)
    bias = _weights((N,), dtype, positive)
    a = _weights((r, K), dtype, positive, K**-0.5)
    b = _weights((N, r), dtype, positive, r**-0.5)
    ref = lora_linear_ref(_d(x), _d(w), _d(bias), _d(a), _d(b), 0.5)
    if variant in LORA_CONFIGS:
        y = lora_kernels.lora_linear_fwd(x, w, bias, a, b, 0.5, config=LORA_CONFIGS[variant])
    else:
        x_lora = x.clone() if variant == "dropout" else None
        y = ops.lora_linear(x, w, bias, a, b, 0.5, x_lora=x_lora, backend="triton")
    assert_same_nonfinite_pattern(y, ref)


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES)
@SIGNS
@pytest.mark.parametrize("launch", list(MULTI_LAUNCHES.values()), ids=list(MULTI_LAUNCHES))
def test_mixed_batch_nonfinite_inputs_match_the_reference(dtype, positive, launch):
    M, K, N = 7, 48, 24
    x = _nonfinite_rows(M, K, dtype)
    w = _weights((N, K), dtype, positive, K**-0.5)
    A = _weights((2, 5, K), dtype, positive, K**-0.5)
    B = _weights((2, N, 5), dtype, positive, 0.5)
    ranks = torch.tensor([3, 5], device=DEVICE, dtype=torch.int32)
    scal = torch.tensor([0.5, 2.0], device=DEVICE)
    slots = torch.tensor([0, 1, 0, 1, 0, 1, -1], device=DEVICE, dtype=torch.int32)
    y = ml.multi_lora_linear_fwd(x, w, None, A, B, ranks, scal, ops_multi.build_meta(slots, 2), launch=launch)
    assert_same_nonfinite_pattern(y, multi_lora_linear_ref(_d(x), _d(w), None, _d(A), _d(B), ranks, _d(scal), slots))


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES)
@SIGNS
@pytest.mark.parametrize("scale_input", [False, True])
def test_ia3_nonfinite_inputs_match_the_reference(dtype, positive, scale_input):
    M, K, N = 7, 48, 24
    x = _nonfinite_rows(M, K, dtype)
    w = _weights((N, K), dtype, positive, K**-0.5)
    bias = _weights((N,), dtype, positive)
    l = (torch.rand(K if scale_input else N, device=DEVICE) + 0.5).to(dtype)
    for cfg in (None, LIBRARY_GEMM):
        y = ia3_kernels.ia3_linear_fwd(x, w, bias, l, scale_input, config=cfg)
        assert_same_nonfinite_pattern(y, ia3_linear_ref(_d(x), _d(w), _d(bias), _d(l), scale_input))


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES)
@SIGNS
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_bottleneck_nonfinite_inputs_match_the_reference(dtype, positive, activation):
    """The fused variant's z = x (Wd W)^T meets an inf input before Wd's signs mix: it
    must still give the reference's z = h Wd^T pattern (NaN for such rows)."""
    M, K, N, D = 7, 48, 24, 6
    x = _nonfinite_rows(M, K, dtype)
    w = _weights((N, K), dtype, positive, K**-0.5)
    bias = _weights((N,), dtype, positive)
    dw, db = (torch.randn(D, N, device=DEVICE) / N**0.5).to(dtype), torch.randn(D, device=DEVICE).to(dtype)
    uw, ub = (torch.randn(N, D, device=DEVICE) / D**0.5).to(dtype), torch.randn(N, device=DEVICE).to(dtype)
    ref = bottleneck_linear_ref(_d(x), _d(w), _d(bias), _d(dw), _d(db), _d(uw), _d(ub), 0.5, activation)
    for cfg in (None, LIBRARY_GEMM):
        y = bn_kernels.bottleneck_linear_fwd(x, w, bias, dw, db, uw, ub, 0.5, activation, config=cfg)
        assert_same_nonfinite_pattern(y, ref)


class _MLP(torch.nn.Module):
    """Two linear layers, positive weights: an inf input entry stays inf to the output
    (no inf - inf), so a NaN there is the kernel's own."""

    def __init__(self, K: int = 40, H: int = 24, N: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(K, H)
        self.fc2 = torch.nn.Linear(H, N)
        with torch.no_grad():
            for p in self.parameters():
                p.abs_()

    def forward(self, x):
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("dtype", NONFINITE_DTYPES)
def test_nonfinite_inputs_through_a_model_match_peft(tmp_path, dtype, launches):
    peft = pytest.importorskip("peft")
    made = peft.get_peft_model(_MLP(), peft.LoraConfig(r=3, target_modules=["fc1", "fc2"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_" in name:
                p.abs_()
    made.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_MLP().to(DEVICE, dtype), tmp_path).eval()
    ours = fp.load_adapter(_MLP().to(DEVICE, dtype), tmp_path).eval()
    x = _nonfinite_rows(7, 40, dtype)
    with torch.no_grad():
        want = theirs(x)
        got = ours(x)
    assert launches, "the Triton kernels did not run"
    assert_same_nonfinite_pattern(got, want)
    rows = ["default", None, "default", "default", None, "default", "default"]
    with torch.no_grad():
        mixed_want = theirs(x, adapter_names=["__base__" if r is None else r for r in rows])
        with fp.batch_adapters(ours, rows):
            mixed = ours(x)
    assert_same_nonfinite_pattern(mixed, mixed_want)
