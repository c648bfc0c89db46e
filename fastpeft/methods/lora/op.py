"""LoRA's op: the fused ``y = x W^T + b + s * (x_l A^T) B^T`` with its own autograd.

``lora_linear`` is the functional entry point. It validates its inputs, picks a backend
(``fastpeft.core.dispatch``) and calls the custom op ``fastpeft::lora_linear``, which is
registered with ``torch.library`` so that ``torch.compile`` traces through models that
use it without graph breaks, and which carries its own autograd formula.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from fastpeft.core.dispatch import (
    autocast_cast,
    autocast_dtype,
    check_adapter_tensors,
    check_bias,
    check_linear_input,
    eager_inference,
    resolve_backend,
    rows,
)
from fastpeft.kernels import lora as _kernels
from fastpeft.kernels.reference import lora_linear_ref

__all__ = ["lora_linear", "lora_linear_unchecked"]


@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, x_lora)
    return _triton_forward(x, weight, bias, lora_A, lora_B, scaling, x_lora)


def _triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
) -> torch.Tensor:
    """The fused kernel; with ``x_lora`` (dropout) the LoRA branch has its own input."""
    xa = None
    if x_lora is not None:
        # Shrink the dropped-out input here (an (M, r) tensor) and let the kernel apply
        # it in the epilogue.
        xa = _kernels.lora_shrink(rows(x_lora), lora_A)
    return _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, xa=xa)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, x_lora, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Grads(NamedTuple):
    """One entry per input of the op: its gradient in the backward, and in
    ``ctx.needs_input_grad`` whether it is needed."""

    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: None = None
    x_lora: Optional[torch.Tensor] = None
    use_triton: None = None


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, x_lora, use_triton = inputs
    ctx.scaling = scaling
    ctx.use_triton = use_triton
    ctx.has_x_lora = x_lora is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, x_lora)


def _backward(ctx, grad_y: torch.Tensor) -> _Grads:
    """Gradients of ``y = x W^T + b + s * (x_l A^T) B^T`` (``g = dL/dy``, rows flattened).

    With ``xa = x_l A^T`` and ``g_a = s * g B`` (the gradient reaching ``xa``):

    * ``dB = s * g^T xa``            (N, r)
    * ``dA = g_a^T x_l``             (r, K)
    * ``dx_l = g_a A``               (M, K), added to ``dx`` when ``x_l`` is ``x``
    * ``dx = g W``                   (M, K), the base path
    * ``db = sum_m g``, ``dW = g^T x`` only when the user unfroze them.

    On the Triton backend, without dropout, ``dx = g W + s * (g B) A`` is the forward's
    own form (input ``g``, base ``W^T``, down ``B^T``, up ``A^T``): one fused launch of
    the forward kernel over transposed *views*, instead of a base GEMM plus two skinny
    ones and a sum.
    """
    x, weight, lora_A, lora_B, x_lora = ctx.saved_tensors
    s = ctx.scaling
    need = _Grads(*ctx.needs_input_grad)
    g = rows(grad_y)
    x_l = rows(x_lora if ctx.has_x_lora else x).to(lora_A.dtype)
    g_l = g.to(lora_B.dtype)
    g_a = (g_l @ lora_B) * s
    d = {}
    if need.lora_B:
        d["lora_B"] = ((g_l.t() @ (x_l @ lora_A.t())) * s).to(lora_B.dtype)
    if need.lora_A:
        d["lora_A"] = (g_a.t() @ x_l).to(lora_A.dtype)
    fused_dx = need.x and ctx.use_triton and not ctx.has_x_lora
    d_lora_in = (g_a @ lora_A) if ((need.x and not fused_dx) or need.x_lora) else None
    if fused_dx:
        # Through the custom op itself, so that torch.compile can trace the backward too.
        d["x"] = _lora_linear_op(grad_y, weight.t(), None, lora_B.t(), lora_A.t(), s, None, True).reshape(x.shape)
    elif need.x:
        d_x = g @ weight
        if not ctx.has_x_lora:
            d_x = d_x + d_lora_in.to(d_x.dtype)
        d["x"] = d_x.reshape(x.shape)
    if need.x_lora and ctx.has_x_lora:
        d["x_lora"] = d_lora_in.to(x_lora.dtype).reshape(x_lora.shape)
    if need.weight:
        d["weight"] = (g.t() @ rows(x)).to(weight.dtype)
    if need.bias:
        d["bias"] = g.sum(0)
    return _Grads(**d)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------- public


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    x_lora: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear ``y = x W^T + b + s * (x_l A^T) B^T``, differentiable.

    ``x_l`` is ``x_lora`` when given (the dropped-out input during training), else ``x``.
    Shapes: ``x (..., K)``, ``weight (N, K)``, ``bias (N,)``, ``lora_A (r, K)``,
    ``lora_B (N, r)``. ``backend`` is ``"auto"``, ``"triton"`` or ``"torch"``. Under
    ``torch.autocast`` it runs in the autocast dtype, as ``F.linear`` does.
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias, lora_A, lora_B, x_lora = autocast_cast(
            autocast_dtype(x.device), x, weight, bias, lora_A, lora_B, x_lora
        )
    check_linear_input(x, weight, "lora_linear")
    check_bias(bias, weight, x, "lora_linear")
    r = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_A.shape[1] != weight.shape[1]:
        raise ValueError(f"lora_A must have shape (r, {weight.shape[1]}), got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape != (weight.shape[0], r):
        raise ValueError(f"lora_B must have shape ({weight.shape[0]}, {r}), got {tuple(lora_B.shape)}")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have the shape of x {tuple(x.shape)}, got {tuple(x_lora.shape)}")
    check_adapter_tensors(x, "lora_linear", lora_A=lora_A, lora_B=lora_B)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_linear: lora_A is {lora_A.dtype} but lora_B is {lora_B.dtype}; keep them in one dtype")
    if x_lora is not None and (x_lora.dtype != x.dtype or x_lora.device != x.device):
        raise TypeError(f"lora_linear: x_lora must match x ({x.dtype} on {x.device}), got {x_lora.dtype} on {x_lora.device}")
    return lora_linear_unchecked(x, weight, bias, lora_A, lora_B, scaling, x_lora, backend)


def lora_linear_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
    backend: str,
    *,
    shrink_copy: Optional[Callable[[], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """:func:`lora_linear` for callers that guarantee the shapes, dtypes and devices
    (a layer that built its own adapters and checked ``x``): no second round of checks
    on the decode path.

    ``shrink_copy``: where ``lora_A`` is fp32 on a 16-bit ``x``, returns ``lora_A`` in
    ``x``'s dtype (kept by the caller, rebuilt when ``A`` changes) or None where that
    would overflow; used on the no-autograd Triton path only (see
    ``fastpeft.kernels.lora.lora_linear_fwd``'s ``lora_A_lowp``), so gradients always
    reach the fp32 ``A`` itself.
    """
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and eager_inference(x, weight, bias, lora_A, lora_B, x_lora):
        # Lean decode path: no autograd and no tracing, so skip the custom-op dispatcher
        # and launch directly.
        if x_lora is None:
            lowp = None if shrink_copy is None or lora_A.dtype == x.dtype else shrink_copy()
            return _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, float(scaling), lora_A_lowp=lowp)
        return _triton_forward(x, weight, bias, lora_A, lora_B, float(scaling), x_lora)
    return _lora_linear_op(x, weight, bias, lora_A, lora_B, float(scaling), x_lora, use_triton)
