"""LoRA adapters stacked in slots for mixed batches, and their per-forward metadata.

A mixed batch runs one fused kernel per layer over *slot stacks*: adapters stacked and
padded to the largest rank, each batch row pointing at its slot. The stacks come from a
provider (the serving ``AdapterPool``'s fixed slots, through the batch plan) or from all
of the layer's own adapters (:func:`stack_adapters`, so they do not depend on which
names a batch uses). The kernel's metadata (rows sorted by slot, segments) depends only
on the slot of each row and the number of token rows per batch row, so, eagerly,
:func:`batch_meta` builds it once per forward of the model and the batch plan hands it to
every layer with the same slot assignment; under ``torch.compile`` it is built in the
graph from the rows' slots.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fastpeft.core.batch import BatchPlan
from fastpeft.kernels.multi_lora_meta import MultiLoraMeta
from fastpeft.methods.lora.multi_op import build_meta, row_slots_for_tokens

__all__ = ["SlotStacks", "SlotRows", "stack_adapters", "batch_meta"]


@dataclass(frozen=True)
class SlotStacks:
    """Adapters in ``S`` slots: ``lora_A: (S, R, K)`` and ``lora_B: (S, N, R)`` hold slot
    ``i``'s adapter in PEFT's layout, padded to ``R`` (the kernels never read past
    ``ranks[i]``); ``ranks (S,)`` int32 and ``scalings (S,)`` fp32; ``bias_table (S + 1,
    N)``: ``s_i * lora_bias_i`` per slot (the last row zeros, for base rows), or None
    without ``lora_bias``; ``mag_table (S + 1, N)`` fp32: DoRA column scales per slot
    (ones for LoRA slots and, last row, for base rows), or None without DoRA."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    bias_table: Optional[torch.Tensor] = None
    mag_table: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SlotRows:
    """What a provider (the serving pool) puts into a batch plan for one layer: its slot
    stacks, the slot of each batch row (``(B,)`` int32, ``-1``: base only) and ``key``,
    naming that slot assignment (layers with equal keys share the batch metadata)."""

    stacks: SlotStacks
    batch_slot: torch.Tensor
    key: Hashable


def batch_meta(plan: BatchPlan, key: Hashable, batch_slot: torch.Tensor, num_slots: int, x: torch.Tensor) -> MultiLoraMeta:
    """The kernel metadata of ``x: (B, ..., K)`` under the slot assignment ``key``
    (``batch_slot``: each batch row's slot), made by the first layer of a forward that
    needs it and found by the others."""
    per_row = math.prod(x.shape[1:-1])

    def make() -> MultiLoraMeta:
        return build_meta(row_slots_for_tokens(batch_slot.to(x.device), x), num_slots, check=False)

    return plan.derived(("lora-meta", key, per_row, x.device), make)


def stack_adapters(adapters: Sequence, device: torch.device, bias_dtype: torch.dtype) -> SlotStacks:
    """Slot stacks of ``adapters`` (``LoraAdapter`` modules; slot ``i`` holds
    ``adapters[i]``), padded to the largest of their ranks."""
    R = max(a.r for a in adapters)
    # Built with autograd on when it is on, so that a backward through a mixed batch
    # reaches each adapter's own tensors through the stacks; with autocast off, since
    # stacking copies tensors in their own dtypes (CPU autocast refuses fp16 there).
    off = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
    with off:
        lora_A = torch.stack([F.pad(a.lora_A, (0, 0, 0, R - a.r)) for a in adapters])
        lora_B = torch.stack([F.pad(a.lora_B, (0, R - a.r)) for a in adapters])
        bias_table = None
        if any(a.lora_bias is not None for a in adapters):
            zero = torch.zeros(lora_B.shape[1], device=device, dtype=bias_dtype)
            table: List[torch.Tensor] = [
                zero if a.lora_bias is None else (a.lora_bias * a.scaling).to(bias_dtype) for a in adapters
            ]
            bias_table = torch.stack(table + [zero])
    return SlotStacks(
        lora_A=lora_A,
        lora_B=lora_B,
        ranks=torch.tensor([a.r for a in adapters], dtype=torch.int32, device=device),
        scalings=torch.tensor([a.scaling for a in adapters], dtype=torch.float32, device=device),
        bias_table=bias_table,
    )
