"""Mixed-adapter LoRA (Triton kernels through fastpeft.methods.lora.multi_op) vs float64 references.

Every row must equal running its own adapter alone: the oracle here is the single-adapter
reference ``lora_linear_ref`` applied per adapter in float64, not the mixed reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, KERNEL_DTYPES
from numerics import assert_matches_ref, rel_err

import fastpeft.methods.lora.multi_op as ops_multi
from fastpeft.kernels import autotune
from fastpeft.kernels import multi_lora as ml
from fastpeft.kernels.multi_lora_meta import GATHER_MAX_M, MultiLoraLaunch, MultiLoraMeta
from fastpeft.kernels.reference import lora_linear_ref, multi_lora_linear_ref


def _stacks(K, N, ranks, dtype, max_rank=None):
    """Slot stacks with each slot's adapter in its first r_i ranks; the padding holds
    garbage on purpose (no kernel may read past r_i)."""
    S = len(ranks)
    R = max_rank or max([1, *ranks])
    A = torch.randn(S, R, K, device=DEVICE, dtype=dtype) * 100.0
    B = torch.randn(S, N, R, device=DEVICE, dtype=dtype) * 100.0
    for i, r in enumerate(ranks):
        A[i, :r] = torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5
        B[i, :, :r] = torch.randn(N, r, device=DEVICE, dtype=dtype) / max(r, 1) ** 0.5
    ranks_t = torch.tensor(ranks, device=DEVICE, dtype=torch.int32)
    scal = torch.rand(S, device=DEVICE) + 0.5
    return A, B, ranks_t, scal


def _base(M, K, N, dtype, bias=True, lead=None):
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(*shape, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    return x, w, b


def _alone64(x, w, b, A, B, ranks, scal, row_slot):
    """Each row through its adapter alone (single-adapter reference, float64)."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K).double()
    d = lambda t: None if t is None else t.double()  # noqa: E731
    out = F.linear(x2, d(w), d(b))
    for m, i in enumerate(row_slot.tolist()):
        if i < 0 or int(ranks[i]) == 0:
            continue
        r = int(ranks[i])
        out[m] = lora_linear_ref(x2[m : m + 1], d(w), d(b), A[i, :r].double(), B[i, :, :r].double(), float(scal[i]))[0]
    return out.reshape(*x.shape[:-1], N)


@pytest.fixture
def launches(monkeypatch):
    """Record every call of the Triton launcher: proof that the kernels ran."""
    calls = []
    real = ml.multi_lora_linear_fwd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops_multi._kernels, "multi_lora_linear_fwd", spy)
    return calls


def _check(y, x, w, b, A, B, ranks, scal, row_slot, dtype):
    ref = _alone64(x, w, b, A, B, ranks, scal, row_slot)
    same = multi_lora_linear_ref(x, w, b, A, B, ranks, scal, row_slot)
    assert y.shape == ref.shape and y.dtype == dtype
    assert_matches_ref(y, ref, same, dtype)


# ----------------------------------------------------------------------------- metadata


def test_meta_running_example():
    """The running example of MultiLoraMeta's docstring, value for value."""
    meta = MultiLoraMeta.build(torch.tensor([2, -1, 0, 2, 0], device=DEVICE), 3)
    as_list = lambda t: t.tolist()  # noqa: E731
    assert as_list(meta.row_slot) == [2, -1, 0, 2, 0]
    assert as_list(meta.sorted_rows) == [2, 4, 0, 3, 1]
    assert as_list(meta.sorted_slot) == [0, 0, 2, 2, -1]
    assert as_list(meta.seg_end) == [2, 2, 4, 4, 5]
    assert as_list(meta.slot_rows) == [2, 0, 2]
    assert as_list(meta.slot_start) == [0, 2, 2]
    assert all(t.dtype == torch.int32 for t in meta.tensors())


# ----------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n_adapters", [1, 3, 8, 16])
def test_each_row_equals_its_adapter_alone(n_adapters, dtype, launches):
    """Mixed ranks 1..64, random row order, ~1/5 of the rows without adapter."""
    M, K, N = 40, 37, 29
    g = torch.Generator().manual_seed(n_adapters)
    ranks = torch.randint(1, 65, (n_adapters,), generator=g).tolist()
    ranks[0] = 64
    if n_adapters > 1:
        ranks[1] = 1
    A, B, ranks_t, scal = _stacks(K, N, ranks, dtype)
    x, w, b = _base(M, K, N, dtype)
    row_slot = torch.randint(-1, n_adapters, (M,), generator=g)
    y = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, row_slot.to(DEVICE), backend="triton")
    assert len(launches) == 1
    _check(y, x, w, b, A, B, ranks_t, scal, row_slot, dtype)
    # the other expand strategy (segment walk vs per-row gather) on the same batch
    meta = ops_multi.build_meta(row_slot.to(DEVICE), n_adapters)
    other = not (M <= GATHER_MAX_M)
    y2 = ml.multi_lora_linear_fwd(x, w, b, A, B, ranks_t, scal, meta, launch=MultiLoraLaunch(gather=other))
    _check(y2, x, w, b, A, B, ranks_t, scal, row_slot, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "case", ["one_row", "one_row_base", "all_one_adapter", "all_base", "rank_zero_slot", "no_bias"]
)
def test_edge_batches(case, dtype, launches):
    K, N = 24, 33
    ranks = [5, 16, 0, 9]
    M = 1 if case.startswith("one_row") else 21
    A, B, ranks_t, scal = _stacks(K, N, ranks, dtype)
    x, w, b = _base(M, K, N, dtype, bias=case != "no_bias")
    row_slot = {
        "one_row": torch.tensor([3]),
        "one_row_base": torch.tensor([-1]),
        "all_one_adapter": torch.full((M,), 1),
        "all_base": torch.full((M,), -1),
        "rank_zero_slot": torch.randint(0, 4, (M,)),
        "no_bias": torch.randint(-1, 4, (M,)),
    }[case]
    y = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, row_slot.to(DEVICE), backend="triton")
    assert launches
    _check(y, x, w, b, A, B, ranks_t, scal, row_slot, dtype)


def test_zero_rows(launches):
    A, B, ranks_t, scal = _stacks(24, 30, [4, 8], torch.float32)
    x, w, b = _base(0, 24, 30, torch.float32)
    y = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, torch.empty(0, dtype=torch.long), backend="triton")
    assert y.shape == (0, 30)
    x3 = torch.randn(2, 0, 24, device=DEVICE)
    y3 = ops_multi.multi_lora_linear(x3, w, b, A, B, ranks_t, scal, torch.empty(0, dtype=torch.long), backend="triton")
    assert y3.shape == (2, 0, 30)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_batch_dims_and_non_contiguous(dtype, launches):
    """(T, B, K) transposed view (two row strides, read in place) and a 4-D input."""
    K, N = 40, 26
    A, B, ranks_t, scal = _stacks(K, N, [3, 12, 33], dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    xt = torch.randn(5, 3, K, device=DEVICE, dtype=dtype).transpose(0, 1)  # (3, 5, K), not contiguous
    row_slot = torch.randint(-1, 3, (15,))
    y = ops_multi.multi_lora_linear(xt, w, b, A, B, ranks_t, scal, row_slot.to(DEVICE), backend="triton")
    assert y.shape == (3, 5, N)
    _check(y, xt, w, b, A, B, ranks_t, scal, row_slot, dtype)
    x4 = torch.randn(2, 3, 4, K, device=DEVICE, dtype=dtype)
    row_slot4 = torch.randint(-1, 3, (24,))
    y4 = ops_multi.multi_lora_linear(x4, w, b, A, B, ranks_t, scal, row_slot4.to(DEVICE), backend="triton")
    _check(y4, x4, w, b, A, B, ranks_t, scal, row_slot4, dtype)
    assert len(launches) == 2


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "launch",
    [
        MultiLoraLaunch(fuse_base=True, gather=False, split_k=1),
        MultiLoraLaunch(fuse_base=False, gather=False, split_k=1),
        MultiLoraLaunch(fuse_base=True, gather=False, split_k=3, shrink_block_m=8),
        MultiLoraLaunch(fuse_base=False, gather=False, split_k=2, block_r=32),
        MultiLoraLaunch(fuse_base=True, gather=True, split_k=1),
        MultiLoraLaunch(fuse_base=False, gather=True, split_k=1, gather_block_r=1),
        MultiLoraLaunch(fuse_base=True, gather=True, split_k=2, gather_block_r=16),
    ],
    ids=["fused", "cublas_base", "fused_splitk", "cublas_base_splitk", "fused_gather", "cublas_base_gather",
         "fused_gather_splitk"],
)
def test_launch_variants_write_every_element(launch, dtype):
    """Both base modes and split-K shrinks; output poisoned with NaN beforehand."""
    M, K, N = 38, 45, 47
    ranks = [7, 0, 40, 16, 1]
    A, B, ranks_t, scal = _stacks(K, N, ranks, dtype)
    x, w, b = _base(M, K, N, dtype)
    row_slot = torch.randint(-1, 5, (M,))
    meta = ops_multi.build_meta(row_slot.to(DEVICE), 5)
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)
    y = ml.multi_lora_linear_fwd(x, w, b, A, B, ranks_t, scal, meta, launch=launch, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, x, w, b, A, B, ranks_t, scal, row_slot, dtype)
    if launch.fuse_base is False:
        # Rows without adapter are cuBLAS's base output, bit for bit.
        base_rows = (row_slot < 0).nonzero().squeeze(1).to(DEVICE)
        assert torch.equal(y[base_rows], F.linear(x, w, b)[base_rows])


def test_rows_sorted_by_slot_or_shuffled_agree():
    """Row order is free: permuting the rows permutes the output (same kernel math)."""
    M, K, N = 33, 30, 28
    A, B, ranks_t, scal = _stacks(K, N, [4, 20, 9], torch.float32)
    x, w, b = _base(M, K, N, torch.float32)
    row_slot = torch.randint(-1, 3, (M,)).to(DEVICE)
    perm = torch.randperm(M).to(DEVICE)
    y = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, row_slot, backend="triton")
    yp = ops_multi.multi_lora_linear(x[perm], w, b, A, B, ranks_t, scal, row_slot[perm], backend="triton")
    assert rel_err(yp, y[perm]) < 1e-6


def test_torch_backend_and_prebuilt_meta():
    M, K, N = 12, 24, 20
    A, B, ranks_t, scal = _stacks(K, N, [2, 6], torch.float32)
    x, w, b = _base(M, K, N, torch.float32)
    row_slot = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1, 0, -1, 0], device=DEVICE)
    meta = ops_multi.build_meta(row_slot, 2)
    y_t = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, meta, backend="torch")
    y_k = ops_multi.multi_lora_linear(x, w, b, A, B, ranks_t, scal, meta, backend="triton")
    ref = _alone64(x, w, b, A, B, ranks_t, scal, row_slot.cpu())
    assert rel_err(y_t, ref) < 1e-6 and rel_err(y_k, ref) < 1e-6
    # python lists for ranks/scalings are accepted too
    y_l = ops_multi.multi_lora_linear(x, w, b, A, B, [2, 6], scal.tolist(), row_slot, backend="torch")
    assert rel_err(y_l, ref) < 1e-6


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    K, N = 24, 20
    A, B, ranks_t, scal = _stacks(K, N, [2, 6], torch.float32)
    x, w, b = _base(6, K, N, torch.float32)
    rs = torch.zeros(6, dtype=torch.long, device=DEVICE)
    mlin = ops_multi.multi_lora_linear
    with pytest.raises(ValueError, match=r"row_slot values must be in \[-1, 2\)"):
        mlin(x, w, b, A, B, ranks_t, scal, torch.tensor([0, 1, 2, 0, 0, 0], device=DEVICE))
    with pytest.raises(ValueError, match="one slot per row"):
        mlin(x, w, b, A, B, ranks_t, scal, rs[:5])
    with pytest.raises(ValueError, match="lora_B must be a slot stack"):
        mlin(x, w, b, A, B[:, :, :3], ranks_t, scal, rs)
    with pytest.raises(ValueError, match="lora_A must be a slot stack"):
        mlin(x, w, b, A[:, :, :5], B, ranks_t, scal, rs)
    with pytest.raises(ValueError, match=r"ranks must be in \[0, 6\]"):
        mlin(x, w, b, A, B, torch.tensor([2, 7], dtype=torch.int32), scal, rs)
    with pytest.raises(ValueError, match="one entry per slot"):
        mlin(x, w, b, A, B, ranks_t[:1], scal, rs)
    with pytest.raises(TypeError, match="must hold integers"):
        mlin(x, w, b, A, B, ranks_t, scal, rs.float())
    with pytest.raises(ValueError, match="metadata was built for 3 slots"):
        mlin(x, w, b, A, B, ranks_t, scal, ops_multi.build_meta(rs, 3))
    with pytest.raises(TypeError, match="dtype"):
        mlin(x.half(), w, b, A, B, ranks_t, scal, rs)


def test_gradients_pass_gradcheck_in_float64():
    """The op's own backward (dx, both stacks, W, b) against finite differences, on
    the reference backend in float64: padded rank lanes (garbage here), a rank-0 slot,
    base-only rows and a slot no row uses included."""
    K, N = 6, 5
    A, B, ranks_t, scal = _stacks(K, N, [2, 0, 3, 1], torch.float64, max_rank=4)
    x, w, b = _base(6, K, N, torch.float64)
    rs = torch.tensor([0, 2, -1, 1, 2, 0], device=DEVICE)
    inputs = [t.clone().requires_grad_(True) for t in (x, w, b, A, B)]

    def f(x_, w_, b_, A_, B_):
        return ops_multi.multi_lora_linear(x_, w_, b_, A_, B_, ranks_t, scal, rs, backend="torch")

    assert torch.autograd.gradcheck(f, inputs)


def _grads(y: torch.Tensor, g: torch.Tensor, inputs) -> list:
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)],
    ids=["fp32", "fp16", "fp16-fp32-adapters"],
)
def test_triton_gradients_match_float64_reference(dtype, adapter_dtype, launches):
    """Triton backend (dx through the fused kernel over transposed stacks) vs autograd
    through the float64 reference; the padded rank lanes' gradients are exactly 0."""
    K, N = 40, 27
    ranks = [4, 33, 0, 1]
    A, B, ranks_t, scal = _stacks(K, N, ranks, adapter_dtype, max_rank=36)
    x, w, b = _base(2 * 5, K, N, dtype, lead=(2, 5))
    rs = torch.tensor([0, 1, -1, 3, 1, 2, 0, 0, -1, 1], device=DEVICE)
    g = torch.randn(2, 5, N, device=DEVICE, dtype=dtype)
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, A, B)]
    launches.clear()
    y = ops_multi.multi_lora_linear(*ins, ranks_t, scal, rs, backend="triton")
    got = _grads(y, g, ins)
    assert len(launches) == 2, "forward and dx must both run the fused kernel"
    ins64 = [t.detach().double().requires_grad_(True) for t in (x, w, b, A, B)]
    want = _grads(multi_lora_linear_ref(*ins64, ranks_t, scal.double(), rs), g.double(), ins64)
    ins_same = [t.detach().clone().requires_grad_(True) for t in (x, w, b, A, B)]
    torch_same = _grads(multi_lora_linear_ref(*ins_same, ranks_t, scal, rs), g, ins_same)
    for name, out, ref, same in zip(("x", "weight", "bias", "lora_A", "lora_B"), got, want, torch_same):
        assert out.dtype == same.dtype, name
        assert_matches_ref(out, ref, same, same.dtype)
    for i, r in enumerate(ranks):
        assert not got[3][i, r:].any() and not got[4][i, :, r:].any(), f"padded lanes of slot {i} got a gradient"
    assert not got[3][2].any() and not got[4][2].any()  # rank 0: nothing


def test_custom_op_fake_registration_and_compile_fullgraph():
    """The op and its backward's adapter-gradient op have valid schemas, fake kernels and
    (the op) an autograd formula AOT autograd traces, on both backends; torch.compile
    traces the op, metadata build included, in one graph (no host syncs with check=False)."""
    K, N = 24, 20
    A, B, ranks_t, scal = _stacks(K, N, [2, 8, 0], torch.float32)
    x, w, b = _base(7, K, N, torch.float32)
    rs = torch.tensor([0, 1, -1, 2, 1, 0, 0], device=DEVICE)
    meta = ops_multi.build_meta(rs, 3)
    x, b, A, B = (t.requires_grad_(True) for t in (x, b, A, B))
    for use_triton in (True, False):
        args = (x, w, b, A, B, ranks_t, scal, *meta.tensors(), use_triton)
        result = torch.library.opcheck(ops_multi._multi_lora_linear_op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    g = torch.randn(7, N, device=DEVICE)
    grads_args = (g, x.detach(), A.detach(), B.detach(), ranks_t, scal, meta.sorted_rows, meta.slot_rows, meta.slot_start)
    result = torch.library.opcheck(ops_multi._adapter_grads_op, grads_args)
    assert all(v == "SUCCESS" for v in result.values()), result

    def f(x_, rs_):
        return ops_multi.multi_lora_linear(x_, w, b, A, B, ranks_t, scal, rs_, check=False)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert rel_err(compiled(x, rs), f(x, rs)) < 1e-6


def test_gpu_launch_choice_is_timed_and_cached(monkeypatch):
    """On a GPU the fused-vs-split base and gather-vs-segment choices are made by timing
    every combination end to end (stubbed timer here), kept per shape and M bucket, and
    whatever is picked computes the right result."""
    fake_ms = {(True, True): 3.0, (True, False): 2.0, (False, True): 4.0, (False, False): 1.0}
    timed = []

    def fake_bench(fn, **kwargs):
        fn()  # each combination really runs
        launch = fake_bench.current
        timed.append(launch)
        return fake_ms[launch]

    real_forward = ml._forward

    def forward(*args, launch, **kwargs):
        fake_bench.current = (launch.fuse_base, launch.gather)
        return real_forward(*args, launch=launch, **kwargs)

    monkeypatch.setattr(ml, "_forward", forward)
    monkeypatch.setattr(autotune.triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(autotune, "TUNED", {})
    # The tuner as on a GPU; the expand tiles forced (the interpreter's), so that only
    # the launch choices are timed.
    monkeypatch.setattr(autotune, "interpreter_active", lambda: False)
    cfg = autotune.INTERPRETER_CONFIG
    M, K, N = 12, 40, 24
    A, B, ranks_t, scal = _stacks(K, N, [4, 9], torch.float32)
    x, w, b = _base(M, K, N, torch.float32)
    row_slot = torch.randint(-1, 2, (M,))
    meta = ops_multi.build_meta(row_slot.to(DEVICE), 2)
    args = (x, w, b, A, B, ranks_t, scal, meta)
    launch = ml._tuned_launch(MultiLoraLaunch(), args, cfg, None)
    assert (launch.fuse_base, launch.gather) == (False, False) and len(timed) == 4
    assert ml._tuned_launch(MultiLoraLaunch(gather=True), args, cfg, None).fuse_base is True
    assert len(timed) == 6  # a forced choice times only the open one
    ml._tuned_launch(MultiLoraLaunch(), args, cfg, None)
    assert len(timed) == 6  # cached
    y = ml._forward(*args, launch=launch, config=cfg, out=None)
    _check(y, x, w, b, A, B, ranks_t, scal, row_slot, torch.float32)


@pytest.mark.parametrize("ranks", [[5, 64, 0], [70, 3]], ids=["one_chunk", "two_chunks"])
def test_shrink_reads_x_once_per_64_ranks(ranks, monkeypatch):
    """The shrink reads its x rows once per rank chunk: by default one chunk covers the
    stack's padded rank up to 64 (not one pass per 16 ranks), and larger stacks take
    chunks of 64; every row still equals its adapter alone."""
    seen = []
    real = ml._mlora_shrink_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(**kw):
                seen.append(kw["BLOCK_R"])
                return real[grid](**kw)

            return launch

    monkeypatch.setattr(ml, "_mlora_shrink_kernel", Spy())
    M, K, N = 9, 40, 24
    A, B, ranks_t, scal = _stacks(K, N, ranks, torch.float32)
    x, w, b = _base(M, K, N, torch.float32)
    row_slot = torch.arange(M) % (len(ranks) + 1) - 1
    meta = ops_multi.build_meta(row_slot.to(DEVICE), len(ranks))
    y = ml.multi_lora_linear_fwd(x, w, b, A, B, ranks_t, scal, meta, launch=MultiLoraLaunch(gather=False))
    _check(y, x, w, b, A, B, ranks_t, scal, row_slot, torch.float32)
    assert seen == [64]
