"""Pure-PyTorch reference of every fused op in fastpeft.

This module is the oracle for the tests and the CPU fallback of the op layer. It is
written for readability first: each function states the math of one fused kernel with
plain PyTorch ops, in the dtype of its inputs. Tests call it on float64 copies of the
inputs to get the "true" answer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .tiles import ACTIVATIONS

__all__ = [
    "lora_linear_ref",
    "lora_linear_parts_ref",
    "lora_linear_dropout_ref",
    "ia3_linear_ref",
    "bottleneck_activation_ref",
    "bottleneck_linear_ref",
    "multi_lora_linear_ref",
    "dora_weight_norm_ref",
    "dora_scaled_ref",
    "dora_linear_ref",
]


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LoRA linear: ``y = x W^T + b + s * (x_lora A^T) B^T``.

    Args:
        x: input, shape ``(..., K)``.
        weight: frozen base weight ``W``, shape ``(N, K)``.
        bias: optional base bias, shape ``(N,)``.
        lora_A: down-projection, shape ``(r, K)`` (PEFT layout).
        lora_B: up-projection, shape ``(N, r)`` (PEFT layout).
        scaling: ``s`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA).
        x_lora: input of the LoRA branch, shape of ``x``; ``None`` means ``x`` itself.
            With dropout this is ``dropout(x)``: PEFT drops the LoRA branch's input only.

    Returns:
        ``y`` of shape ``(..., N)`` in the dtype of ``x``. The LoRA branch runs in the
        adapters' dtype and is added to the base in the promoted dtype before the cast
        back to ``x``'s dtype, as PEFT's ``Linear.forward`` does (an fp32 update on an
        fp16 base is not rounded to fp16 on its own, where it could overflow).
    """
    return lora_linear_parts_ref(x, weight, bias, lora_A, lora_B, scaling, x_lora)[0]


def lora_linear_parts_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`lora_linear_ref`'s ``y`` and the shrink ``xa = x_lora A^T`` it went through
    (``(..., r)``, in the adapters' dtype): the training path keeps ``xa`` for ``dB``."""
    base = F.linear(x, weight, bias)
    xl = x if x_lora is None else x_lora
    xa = F.linear(xl.to(lora_A.dtype), lora_A)
    update = F.linear(xa, lora_B) * scaling
    return (base + update).to(base.dtype), xa


def lora_linear_dropout_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """LoRA linear with dropout on the branch's input, given its keep mask:
    ``y = x W^T + b + s * ((keep * x / (1 - p)) A^T) B^T`` (``keep``: bool, shape of
    ``x``; the Triton kernels regenerate theirs from a seed, and
    ``lora_train.dropout_mask`` materialises it for comparison)."""
    x_lora = x * keep.to(x.dtype) / (1.0 - p)
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, x_lora)


def ia3_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
) -> torch.Tensor:
    """(IA)^3 linear, as PEFT's ``IA3Layer`` computes it.

    * output scaling (``scale_input=False``, attention k/v): ``y = (x W^T + b) * l``,
      ``l`` of N entries (PEFT stores it as ``(N, 1)``);
    * input scaling (``scale_input=True``, feed-forward): ``y = (x * l) W^T + b``,
      ``l`` of K entries (PEFT stores it as ``(1, K)``).

    ``l`` may have any shape with that many entries. The scaled tensor is computed in
    the promoted dtype and rounded back to ``x``'s dtype, as PEFT does.
    """
    l = ia3_l.reshape(-1)
    if scale_input:
        return F.linear((x * l).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias) * l).to(x.dtype)


# PyTorch form of each code of ``tiles.ACTIVATIONS`` (the one list of names).
_TORCH_ACTIVATIONS = {0: F.relu, 1: F.gelu, 2: F.silu, 3: torch.tanh}


def bottleneck_activation_ref(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The bottleneck non-linearity ``f``: relu, gelu (exact erf form), silu/swish, tanh
    (the names of :data:`fastpeft.kernels.tiles.ACTIVATIONS`)."""
    code = ACTIVATIONS.get(activation)
    if code is None:
        raise ValueError(f"unknown non-linearity {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    return _TORCH_ACTIVATIONS[code](z)


def bottleneck_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float,
    activation: str,
    ln_before: Optional[tuple] = None,
    ln_after: Optional[tuple] = None,
    residual_before_ln: bool = True,
    ln_eps: float = 1e-5,
) -> torch.Tensor:
    """Bottleneck adapter (Houlsby / Pfeiffer) on the output of a linear layer::

        h = x W^T + b                                  the sub-layer output
        u = LN_before(h)            if ln_before else h
        a = s * (f(u Wd^T + bd) Wu^T + bu)
        a = LN_after(a)             if ln_after  else a
        y = (h if residual_before_ln else u) + a

    Args:
        x: ``(..., K)``; weight ``(N, K)``; bias ``(N,)`` or None.
        down_w: ``(D, N)``, down_b ``(D,)`` or None; up_w ``(N, D)``, up_b ``(N,)`` or None.
        scaling: ``s``; activation: see :func:`bottleneck_activation_ref`.
        ln_before, ln_after: ``(gamma, beta)`` of a layer norm over N, or None.
        residual_before_ln: which tensor the residual adds (only differs with ln_before).
        ln_eps: layer-norm epsilon.
    """
    h = F.linear(x, weight, bias)
    u = h
    if ln_before is not None:
        u = F.layer_norm(h, (h.shape[-1],), ln_before[0], ln_before[1], ln_eps)
    a = F.linear(bottleneck_activation_ref(F.linear(u, down_w, down_b), activation), up_w, up_b) * scaling
    if ln_after is not None:
        a = F.layer_norm(a, (a.shape[-1],), ln_after[0], ln_after[1], ln_eps)
    return (h if residual_before_ln else u) + a


def multi_lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    row_slot: torch.Tensor,
    mag_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixed-adapter LoRA linear: each row of ``x`` through its own adapter slot::

        y[m] = x[m] W^T + b                                  if row_slot[m] == -1
        y[m] = x[m] W^T + b + s_i * (x[m] A_i^T) B_i^T        if row_slot[m] == i

    with ``A_i = lora_A[i, :r_i]`` and ``B_i = lora_B[i, :, :r_i]`` (``r_i = ranks[i]``,
    ``s_i = scalings[i]``).

    Args:
        x: ``(..., K)``; its rows (leading dims flattened) are ``row_slot``'s rows.
        weight: ``(N, K)``; bias: ``(N,)`` or None.
        lora_A: ``(S, max_rank, K)``; lora_B: ``(S, N, max_rank)``: slot stacks.
        ranks: ``(S,)`` integers in ``[0, max_rank]``; scalings: ``(S,)``.
        row_slot: ``(M,)`` integers in ``[-1, S)``, M = number of rows of ``x``.
        mag_scale: optional ``(S, N)`` DoRA column scales ``c_i`` (ones for a LoRA
            slot): rows of slot ``i`` become ``c_i * (x W^T + s_i (x A_i^T) B_i^T) + b``,
            each as :func:`dora_linear_ref`.

    Returns:
        ``y`` of shape ``(..., N)`` in ``x``'s dtype. Each slot's LoRA branch runs in the
        adapters' dtype and is cast back, as :func:`lora_linear_ref` does.
    """
    if mag_scale is not None:
        return _multi_dora_ref(x, weight, bias, lora_A, lora_B, ranks, scalings, row_slot, mag_scale)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    y = F.linear(x2, weight, bias)
    slot = row_slot.reshape(-1).to(device=x.device, dtype=torch.long)
    for i in torch.unique(slot[slot >= 0]).tolist():
        r = int(ranks[i])
        if r == 0:
            continue
        rows = (slot == i).nonzero().squeeze(1)
        A = lora_A[i, :r]
        B = lora_B[i, :, :r]
        xl = x2.index_select(0, rows).to(A.dtype)
        update = F.linear(F.linear(xl, A), B) * float(scalings[i])
        y = y.index_add(0, rows, update.to(y.dtype))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _multi_dora_ref(x, weight, bias, lora_A, lora_B, ranks, scalings, row_slot, mag_scale) -> torch.Tensor:
    """:func:`multi_lora_linear_ref` with DoRA column scales: each slot's rows as
    :func:`dora_linear_ref` with ``c_i = mag_scale[i]``."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    y = F.linear(x2, weight, bias)
    slot = row_slot.reshape(-1).to(device=x.device, dtype=torch.long)
    for i in torch.unique(slot[slot >= 0]).tolist():
        rows = (slot == i).nonzero().squeeze(1)
        r = int(ranks[i])
        out = dora_scaled_ref(
            x2.index_select(0, rows), weight, bias, lora_A[i, :r], lora_B[i, :, :r], float(scalings[i]), mag_scale[i]
        )
        y = y.index_copy(0, rows, out.to(y.dtype))
    return y.reshape(*x.shape[:-1], N)


def dora_weight_norm_ref(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """DoRA's row norms ``||W + s B A||`` (one per output row, ``(N,)``), in fp32 or the
    weight's dtype if wider: ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    full = weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
    return torch.linalg.vector_norm(full, dim=1)


def dora_scaled_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    mag_scale: torch.Tensor,
) -> torch.Tensor:
    """``y = c * (x W^T + s (x A^T) B^T) + b`` for a given column scale ``c`` (``(N,)``):
    the fused kernel's DoRA epilogue (``c = m / ||W + s B A||``)."""
    z = lora_linear_ref(x, weight, None, lora_A, lora_B, scaling)
    c = mag_scale.to(torch.promote_types(z.dtype, mag_scale.dtype))
    y = z * c
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def dora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    x_lora: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA linear (PEFT's ``DoraLinearLayer``): with ``c = m / ||W + s B A||`` (the norm
    per output row, detached from autograd, as PEFT)::

        y = x W^T + b + (c - 1) * (x_l W^T) + c * s * (x_l A^T) B^T

    ``x_l`` is ``x_lora`` (the dropped-out input) or ``x``; without dropout this is
    ``c * (x W^T + s (x A^T) B^T) + b``. ``magnitude``: ``m``, shape ``(N,)``.
    """
    norm = dora_weight_norm_ref(weight, lora_A, lora_B, scaling).detach()
    c = magnitude / norm.to(magnitude.dtype)
    if x_lora is None:
        return dora_scaled_ref(x, weight, bias, lora_A, lora_B, scaling, c)
    base = F.linear(x, weight, bias)
    dora = dora_scaled_ref(x_lora, weight, None, lora_A, lora_B, scaling, c) - F.linear(x_lora, weight)
    return (base + dora).to(x.dtype)
