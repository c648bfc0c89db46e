"""LoRA's mixed-adapter op: every row with its own LoRA adapter (or none).

``multi_lora_linear`` validates its inputs, builds (or takes) the batch metadata
(:class:`fastpeft.kernels.multi_lora.MultiLoraMeta`), picks a backend and calls the custom
op ``fastpeft::multi_lora_linear``. The op is registered with ``torch.library`` (so
``torch.compile`` traces through it) and carries its own autograd formula: gradients
reach ``x``, both slot stacks and (when unfrozen) the base weight and bias, so a mixed
batch can be inspected by per-row losses, eager or compiled (AOT autograd traces the
backward whenever an input requires grad).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from fastpeft.kernels import multi_lora as _kernels
from fastpeft.kernels.multi_lora_meta import MultiLoraMeta
from fastpeft.kernels.reference import multi_lora_linear_ref
from fastpeft.core.dispatch import check_bias, check_linear_input, eager_inference, resolve_backend
from fastpeft.core.dispatch import rows as _rows

__all__ = ["MultiLoraMeta", "multi_lora_linear", "multi_lora_linear_unchecked", "build_meta", "row_slots_for_tokens"]


@torch.library.custom_op("fastpeft::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    row_slot: torch.Tensor,
    sorted_rows: torch.Tensor,
    sorted_slot: torch.Tensor,
    seg_end: torch.Tensor,
    slot_rows: torch.Tensor,
    slot_start: torch.Tensor,
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return multi_lora_linear_ref(x, weight, bias, lora_A, lora_B, ranks, scalings, row_slot)
    meta = MultiLoraMeta(
        row_slot=row_slot,
        sorted_rows=sorted_rows,
        sorted_slot=sorted_slot,
        seg_end=seg_end,
        slot_rows=slot_rows,
        slot_start=slot_start,
        num_slots=lora_A.shape[0],
    )
    return _kernels.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, ranks, scalings, meta)


@_multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, ranks, scalings, row_slot, sorted_rows, sorted_slot, seg_end,
      slot_rows, slot_start, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fastpeft::multi_lora_adapter_grads", mutates_args=())
def _adapter_grads_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    sorted_rows: torch.Tensor,
    slot_rows: torch.Tensor,
    slot_start: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(d lora_A, d lora_B)`` of the mixed op, slot by slot over each slot's rows.

    A custom op (opaque to ``torch.compile``) because each slot's GEMMs have as many
    rows as the batch gives that slot: shapes that depend on the data. The row counts
    and ranks are read with one host sync; the padded rank lanes keep a zero gradient.
    """
    d_a = torch.zeros_like(lora_A)
    d_b = torch.zeros_like(lora_B)
    g = _rows(grad_y).to(lora_B.dtype)
    x2 = _rows(x).to(lora_A.dtype)
    counts = torch.stack([slot_start, slot_rows, ranks]).tolist()
    for i, (start, n, r) in enumerate(zip(*counts)):
        if n == 0 or r == 0:
            continue
        idx = sorted_rows[start : start + n].long()
        x_i, g_i = x2.index_select(0, idx), g.index_select(0, idx)
        A_i, B_i = lora_A[i, :r], lora_B[i, :, :r]
        s_i = scalings[i]  # fp32, as the forward kernels apply it
        d_b[i, :, :r] = (g_i.t() @ (x_i @ A_i.t())) * s_i
        d_a[i, :r] = (((g_i @ B_i) * s_i).t() @ x_i).to(lora_A.dtype)
    return d_a, d_b


@_adapter_grads_op.register_fake
def _(grad_y, x, lora_A, lora_B, ranks, scalings, sorted_rows, slot_rows, slot_start):
    return torch.empty_like(lora_A), torch.empty_like(lora_B)


class _Grads(NamedTuple):
    """One entry per input of the op: its gradient, or (``ctx.needs_input_grad``)
    whether it is needed (the integer inputs never have one)."""

    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    ranks: None = None
    scalings: None = None
    row_slot: None = None
    sorted_rows: None = None
    sorted_slot: None = None
    seg_end: None = None
    slot_rows: None = None
    slot_start: None = None
    use_triton: None = None


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, ranks, scalings, *meta, use_triton = inputs
    ctx.use_triton = use_triton
    ctx.save_for_backward(x, weight, lora_A, lora_B, ranks, scalings, *meta)


def _backward(ctx, grad_y: torch.Tensor) -> _Grads:
    """Gradients of ``y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T`` (``i`` = slot of row
    ``m``, ``A_i = lora_A[i, :r_i]``, ``B_i = lora_B[i, :, :r_i]``; ``g = dL/dy``, rows
    flattened). Per slot, over its rows ``X_i``, ``G_i``, with ``XA_i = X_i A_i^T`` and
    ``G_a = s_i G_i B_i`` (the gradient reaching ``XA_i``):

    * ``dB_i = s_i G_i^T XA_i``      (N, r_i); lanes ``r_i..max_rank`` get 0
    * ``dA_i = G_a^T X_i``           (r_i, K); lanes ``r_i..max_rank`` get 0
    * ``dx[m] = g[m] W + s_i (g[m] B_i) A_i``: the forward's own form (input ``g``, base
      ``W^T``, stacks ``B^T`` and ``A^T``, same slots, ranks and scalings), so one call
      of the op itself, on the forward's backend (the fused kernel over transposed
      views on Triton), which ``torch.compile`` traces like the forward
    * ``db = sum_m g``, ``dW = g^T x`` only when the user unfroze them.

    As in the forward, the LoRA terms run in the adapters' dtype, the base in ``x``'s.
    """
    x, weight, lora_A, lora_B, ranks, scalings, *meta = ctx.saved_tensors
    _, sorted_rows, _, _, slot_rows, slot_start = meta
    need = _Grads(*ctx.needs_input_grad)
    d = {}
    if need.x:
        d["x"] = _multi_lora_linear_op(
            grad_y, weight.t(), None, lora_B.transpose(1, 2), lora_A.transpose(1, 2), ranks, scalings,
            *meta, ctx.use_triton,
        ).reshape(x.shape)
    if need.lora_A or need.lora_B:
        d_a, d_b = _adapter_grads_op(grad_y, x, lora_A, lora_B, ranks, scalings, sorted_rows, slot_rows, slot_start)
        d.update({k: v for k, v in (("lora_A", d_a), ("lora_B", d_b)) if getattr(need, k)})
    g = _rows(grad_y)
    if need.weight:
        d["weight"] = (g.t() @ _rows(x)).to(weight.dtype)
    if need.bias:
        d["bias"] = g.sum(0)
    return _Grads(**d)


_multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------- public


def build_meta(row_slot: torch.Tensor, num_slots: int, *, check: bool = True) -> MultiLoraMeta:
    """:class:`MultiLoraMeta` for ``row_slot`` (one slot per row, -1: base only).

    ``check`` verifies that every slot is in ``[-1, num_slots)`` (one host sync; pass
    False where the slots are known good, e.g. inside a captured CUDA graph).
    """
    if not isinstance(row_slot, torch.Tensor):
        raise TypeError(f"row_slot must be a tensor of slot indices, got {type(row_slot).__name__}")
    if row_slot.dim() != 1:
        raise ValueError(f"row_slot must be 1-D (one slot per row), got shape {tuple(row_slot.shape)}")
    if row_slot.dtype.is_floating_point or row_slot.dtype == torch.bool or row_slot.is_complex():
        raise TypeError(f"row_slot must hold integers, got {row_slot.dtype}")
    if check and row_slot.numel() > 0:
        lo, hi = int(row_slot.min()), int(row_slot.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(
                f"row_slot values must be in [-1, {num_slots}) (-1: base only; {num_slots} slots), "
                f"got values in [{lo}, {hi}]"
            )
    return MultiLoraMeta.build(row_slot, num_slots)


def row_slots_for_tokens(batch_slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expand one slot per batch row (``x``'s dim 0) to one slot per row of ``x``'s
    flattened leading dims (``x: (B, ..., K)``)."""
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    return batch_slot if per_row == 1 else batch_slot.repeat_interleave(per_row)


def _check_stacks(x, weight, bias, lora_A, lora_B) -> Tuple[int, int]:
    """``(S, max_rank)`` of slot stacks that fit ``x`` and ``weight`` (else a clear error)."""
    N, K = weight.shape
    if bias is not None and bias.dtype != x.dtype:
        raise ValueError(f"bias must be a {x.dtype} tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
    if lora_A.dim() != 3 or lora_A.shape[2] != K:
        raise ValueError(f"lora_A must be a slot stack of shape (S, max_rank, {K}), got {tuple(lora_A.shape)}")
    S, max_rank = lora_A.shape[0], lora_A.shape[1]
    if lora_B.shape != (S, N, max_rank):
        raise ValueError(
            f"lora_B must be a slot stack of shape ({S}, {N}, {max_rank}) to match lora_A "
            f"{tuple(lora_A.shape)}, got {tuple(lora_B.shape)}"
        )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.dtype.is_floating_point or t.device != x.device:
            raise ValueError(f"{name} must be a floating tensor on {x.device}, got {t.dtype} on {t.device}")
    return S, max_rank


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: Union[torch.Tensor, Sequence[int]],
    scalings: Union[torch.Tensor, Sequence[float]],
    rows: Union[torch.Tensor, MultiLoraMeta],
    *,
    backend: str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """Mixed-adapter LoRA linear ``y[m] = x[m] W^T + b + s_i (x[m] A_i^T) B_i^T``.

    Args:
        x: ``(..., K)``; its rows are the leading dims flattened (M rows).
        weight: ``(N, K)``; bias: ``(N,)`` or None (``x``'s dtype).
        lora_A: ``(S, max_rank, K)`` and lora_B: ``(S, N, max_rank)``: adapters stacked in
            slots (PEFT layout per slot), padded to ``max_rank``; never read past ``r_i``.
        ranks: ``(S,)`` rank of each slot, ``0 <= r_i <= max_rank`` (0: slot adds nothing).
        scalings: ``(S,)`` scaling ``s_i`` of each slot.
        rows: ``(M,)`` slot of each row (``-1``: base only), or a prebuilt
            :class:`MultiLoraMeta` (build it once per batch and share it across layers).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastpeft.core.dispatch.resolve_backend``).
        check: verify the values of ``ranks`` and ``rows`` (host syncs); callers that own
            them (the adapter pool) pass False on the hot path.

    Returns ``(..., N)`` in ``x``'s dtype. Differentiable in ``x``, the stacks (each
    slot's first ``r_i`` rank lanes; the padding's gradient is 0), ``weight`` and ``bias``.
    """
    check_linear_input(x, weight, "multi_lora_linear")
    check_bias(bias, weight, x, "multi_lora_linear")
    S, max_rank = _check_stacks(x, weight, bias, lora_A, lora_B)
    # The kernels read one entry per slot with unit stride.
    ranks = torch.as_tensor(ranks, device=x.device).to(torch.int32).contiguous()
    scalings = torch.as_tensor(scalings, device=x.device).to(torch.float32).contiguous()
    if ranks.shape != (S,) or scalings.shape != (S,):
        raise ValueError(
            f"ranks and scalings must have one entry per slot ({S},), got {tuple(ranks.shape)} and "
            f"{tuple(scalings.shape)}"
        )
    if check and S > 0:
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or hi > max_rank:
            raise ValueError(f"ranks must be in [0, {max_rank}] (the stacks' max_rank), got values in [{lo}, {hi}]")
    M = x[..., 0].numel()
    if isinstance(rows, MultiLoraMeta):
        meta = rows
        if meta.num_slots != S:
            raise ValueError(f"metadata was built for {meta.num_slots} slots, the stacks have {S}")
    else:
        meta = build_meta(torch.as_tensor(rows, device=x.device), S, check=check)
    if meta.num_rows != M:
        raise ValueError(
            f"one slot per row of x is needed: x has {M} rows (leading dims {tuple(x.shape[:-1])} "
            f"flattened), got {meta.num_rows} slots"
        )
    return multi_lora_linear_unchecked(x, weight, bias, lora_A, lora_B, ranks, scalings, meta, backend)


def multi_lora_linear_unchecked(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor, meta: MultiLoraMeta, backend: str,
) -> torch.Tensor:
    """:func:`multi_lora_linear` for callers that guarantee what it checks (a layer with
    its own or a pool's slot stacks, ``ranks`` int32 and ``scalings`` fp32 contiguous on
    ``x``'s device, ``meta`` built for these rows and slots): with neither autograd nor a
    trace to serve, the kernels are launched directly, without the custom-op dispatcher."""
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and eager_inference(x, weight, bias, lora_A, lora_B):
        return _kernels.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, ranks, scalings, meta)
    return _multi_lora_linear_op(x, weight, bias, lora_A, lora_B, ranks, scalings, *meta.tensors(), use_triton)
