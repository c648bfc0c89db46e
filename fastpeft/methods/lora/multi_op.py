"""LoRA's mixed-adapter op: every row with its own LoRA adapter (or none).

``multi_lora_linear`` validates its inputs, builds (or takes) the batch metadata
(:class:`fastpeft.kernels.multi_lora.MultiLoraMeta`), picks a backend and calls the custom
op ``fastpeft::multi_lora_linear``. The op is registered with ``torch.library`` (so
``torch.compile`` traces through it) and is for inference: its backward raises a clear
error, since serving many adapters at once is not a training mode (train one adapter
per batch with ``set_adapter``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from fastpeft.kernels import multi_lora as _kernels
from fastpeft.kernels.multi_lora import MultiLoraMeta
from fastpeft.kernels.reference import multi_lora_linear_ref
from fastpeft.core.dispatch import check_bias, check_linear_input, resolve_backend

__all__ = ["MultiLoraMeta", "multi_lora_linear", "build_meta", "row_slots_for_tokens"]


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


def _setup_context(ctx, inputs, output) -> None:
    pass


def _backward(ctx, grad_y):
    raise RuntimeError(
        "fastpeft's mixed-adapter op (batch_adapters / AdapterPool serving) is inference-only and "
        "has no backward: run it under torch.no_grad() / torch.inference_mode(), or train one "
        "adapter per batch (set_adapter) instead of a mixed batch"
    )


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

    Returns ``(..., N)`` in ``x``'s dtype. Inference only: backward raises.
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
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    return _multi_lora_linear_op(x, weight, bias, lora_A, lora_B, ranks, scalings, *meta.tensors(), use_triton)
