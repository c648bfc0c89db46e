"""DoRA's ops: the LoRA linear with a magnitude per output column, fused.

DoRA (Liu et al., 2024) as PEFT 0.21's ``DoraLinearLayer`` computes it, with
``c = m / ||W + s B A||`` (one norm per output row of ``W``, detached from autograd)::

    y = x W^T + b + (c - 1) * (x_l W^T) + c * s * (x_l A^T) B^T

``x_l`` is the LoRA branch's input: ``dropout(x)`` in training, else ``x``, when the
formula is ``y = c * (x W^T + s (x A^T) B^T) + b``: the fused LoRA kernel with the
column scale ``c`` in its epilogue (``fastpeft.kernels.lora``, ``HAS_MAG``). With
dropout, the same kernel runs on ``x_l`` and the base on ``x - x_l`` is added:
``(x - x_l) W^T + b + c * (x_l W^T + s (x_l A^T) B^T)``, PEFT's formula regrouped.

The norms come from one kernel that reads ``W`` once (``fastpeft.kernels.dora``); layers
keep them in eval mode. Gradients: when autograd needs the op, ``y`` is the LoRA op's
output times ``c`` in PyTorch (so the LoRA op's backward gives ``dA``, ``dB``, ``dx``,
and ``dm = sum_rows(g * z) / norm`` comes from autograd), the norm detached as in PEFT.
The forward-only custom ops (``fastpeft::dora_linear``, ``fastpeft::multi_dora_linear``,
``fastpeft::dora_weight_norm``) let ``torch.compile`` trace inference without breaks.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastpeft.core.dispatch import eager_inference, resolve_backend
from fastpeft.kernels import dora as _dora_kernels
from fastpeft.kernels import lora as _lora_kernels
from fastpeft.kernels import multi_lora as _multi_kernels
from fastpeft.kernels.multi_lora_meta import MultiLoraMeta
from fastpeft.kernels.reference import dora_scaled_ref, dora_weight_norm_ref, multi_lora_linear_ref
from fastpeft.methods.lora.multi_op import build_meta
from fastpeft.methods.lora.op import lora_linear_unchecked

__all__ = ["dora_weight_norm", "dora_linear_unchecked", "dora_scale", "multi_dora_linear"]


@torch.library.custom_op("fastpeft::dora_weight_norm", mutates_args=())
def _norm_op(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
             use_triton: bool) -> torch.Tensor:
    if not use_triton:
        return dora_weight_norm_ref(weight, lora_A, lora_B, scaling).float()
    return _dora_kernels.dora_weight_norm(weight, lora_A, lora_B, scaling)


@_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, use_triton):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


def dora_weight_norm(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, backend: str = "auto"
) -> torch.Tensor:
    """``||W + s B A||`` per output row, ``(N,)`` fp32, detached (PEFT detaches it):
    ``W: (N, K)`` (any strides), ``A: (r, K)``, ``B: (N, r)``."""
    weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
    dtypes = (weight.dtype, lora_A.dtype, lora_B.dtype)
    use_triton = all(resolve_backend(backend, weight.device, d) == "triton" for d in dtypes)
    if use_triton and not torch.compiler.is_compiling():
        return _dora_kernels.dora_weight_norm(weight, lora_A, lora_B, float(scaling))
    return _norm_op(weight, lora_A, lora_B, float(scaling), use_triton)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``c = m / norm`` in fp32 (or ``m``'s dtype if wider), differentiable in ``m``."""
    return magnitude.to(torch.promote_types(magnitude.dtype, torch.float32)) / norm


# --------------------------------------------------------------------- single adapter


@torch.library.custom_op("fastpeft::dora_linear", mutates_args=())
def _dora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mag_scale: torch.Tensor,
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return dora_scaled_ref(x, weight, bias, lora_A, lora_B, scaling, mag_scale)
    return _fused(x, weight, bias, lora_A, lora_B, scaling, mag_scale)


@_dora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, mag_scale, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _fused(x, weight, bias, lora_A, lora_B, scaling: float, mag_scale: torch.Tensor) -> torch.Tensor:
    """``c * (x W^T + s (x A^T) B^T) + b``: one launch of the fused LoRA kernel with the
    DoRA epilogue."""
    return _lora_kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, mag=mag_scale.float().contiguous())


def dora_linear_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    x_lora: Optional[torch.Tensor],
    backend: str,
    mag_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA linear (see the module docstring) for callers that checked the shapes (a
    layer): ``magnitude`` ``m`` and ``norm`` (``dora_weight_norm``) are ``(N,)``;
    ``mag_scale``: ``m / norm`` when the caller keeps it (no autograd through it)."""
    x_l = x if x_lora is None else x_lora
    core_bias = bias if x_lora is None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, magnitude, x_lora)
    )
    if needs_grad:
        # Autograd: the LoRA op (its own backward) times c, with dm from autograd.
        z = lora_linear_unchecked(x_l, weight, None, lora_A, lora_B, scaling, None, backend)
        y = z * dora_scale(magnitude, norm)
        if core_bias is not None:
            y = y + core_bias
        y = y.to(x.dtype)
    else:
        c = mag_scale if mag_scale is not None else dora_scale(magnitude, norm)
        use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
        if use_triton and eager_inference(x, weight, bias, lora_A, lora_B, x_lora):
            y = _fused(x_l, weight, core_bias, lora_A, lora_B, float(scaling), c)
        else:
            y = _dora_linear_op(x_l, weight, core_bias, lora_A, lora_B, float(scaling), c.detach(), use_triton)
    if x_lora is not None:
        y = y + F.linear(x - x_lora, weight, bias)
    return y


# --------------------------------------------------------------------- mixed batches


@torch.library.custom_op("fastpeft::multi_dora_linear", mutates_args=())
def _multi_dora_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    mag_table: torch.Tensor,
    row_slot: torch.Tensor,
    sorted_rows: torch.Tensor,
    sorted_slot: torch.Tensor,
    seg_end: torch.Tensor,
    slot_rows: torch.Tensor,
    slot_start: torch.Tensor,
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return multi_lora_linear_ref(x, weight, bias, lora_A, lora_B, ranks, scalings, row_slot, mag_table)
    meta = MultiLoraMeta(
        row_slot=row_slot, sorted_rows=sorted_rows, sorted_slot=sorted_slot, seg_end=seg_end,
        slot_rows=slot_rows, slot_start=slot_start, num_slots=lora_A.shape[0],
    )
    return _multi_kernels.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, ranks, scalings, meta, mag=mag_table)


@_multi_dora_op.register_fake
def _(x, weight, bias, lora_A, lora_B, ranks, scalings, mag_table, row_slot, sorted_rows, sorted_slot, seg_end,
      slot_rows, slot_start, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def multi_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    mag_table: torch.Tensor,
    meta: Union[MultiLoraMeta, torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """A mixed batch with DoRA slots, inference only: row ``m`` of slot ``i`` is
    ``mag_table[i] * (x W^T + s_i (x A_i^T) B_i^T) + b`` (``mag_table: (S, N)`` fp32,
    ones for LoRA slots; rows with no adapter: the base), the scale in the mixed
    kernel's epilogue. ``meta``: the batch metadata, or each token row's slot (built into
    metadata here: in a compiled graph). Callers (a layer) checked the stacks."""
    if isinstance(meta, torch.Tensor):
        meta = build_meta(meta, lora_A.shape[0], check=False)
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    mag_table = mag_table.detach().float().contiguous()
    if use_triton and eager_inference(x, weight, bias, lora_A, lora_B):
        return _multi_kernels.multi_lora_linear_fwd(x, weight, bias, lora_A, lora_B, ranks, scalings, meta,
                                                    mag=mag_table)
    return _multi_dora_op(x, weight, bias, lora_A, lora_B, ranks, scalings, mag_table, *meta.tensors(), use_triton)
