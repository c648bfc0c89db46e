"""(IA)^3's op: ``y = (x W^T + b) * l`` or ``y = (x * l) W^T + b``, fused, with autograd.

``ia3_linear`` validates its inputs, picks a backend (``fastpeft.core.dispatch``) and
calls the custom op ``fastpeft::ia3_linear`` registered with ``torch.library``: a fake
(meta) implementation for ``torch.compile`` and an autograd formula whose backward uses
PyTorch ops. Gradients flow to ``x`` and ``l``; the frozen base gets gradients only when
the user unfroze it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

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
from fastpeft.kernels import ia3 as _ia3_kernels
from fastpeft.kernels import ia3_train as _ia3_train_kernels
from fastpeft.kernels.reference import ia3_linear_ref

__all__ = ["ia3_linear", "ia3_linear_unchecked"]


@torch.library.custom_op("fastpeft::ia3_linear", mutates_args=())
def _ia3_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return ia3_linear_ref(x, weight, bias, ia3_l, scale_input)
    return _ia3_kernels.ia3_linear_fwd(x, weight, bias, ia3_l, scale_input)


@_ia3_linear_op.register_fake
def _(x, weight, bias, ia3_l, scale_input, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Grads(NamedTuple):
    """One entry per input of the op: its gradient, or (``ctx.needs_input_grad``)
    whether it is needed."""

    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    ia3_l: Optional[torch.Tensor] = None
    scale_input: None = None
    use_triton: None = None


def _ia3_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, ia3_l, scale_input, use_triton = inputs
    ctx.scale_input, ctx.use_triton = scale_input, use_triton
    ctx.save_for_backward(x, weight, bias, ia3_l)


def _ia3_backward(ctx, grad_y: torch.Tensor) -> _Grads:
    """Gradients of (IA)^3 (``g = dL/dy``, rows of ``x`` flattened to ``(M, K)``).

    Output scaling, ``y = h * l`` with ``h = x W^T + b`` and ``l`` of N entries:

    * ``dL/dh = g * l`` (broadcast over rows), so ``dx = (g * l) W``: on Triton the
      input-scaling forward kernel over ``W^T`` (a view), one launch and no fp32 copy of ``g``;
    * ``dl_n = sum_m g_mn h_mn``: ``h`` is recomputed (one GEMM) rather than saved, so
      the forward keeps no ``(M, N)`` activation;
    * ``dW = (g * l)^T x``, ``db = sum_m (g * l)`` when the base is unfrozen.

    Input scaling, ``y = (x * l) W^T + b`` with ``l`` of K entries, ``u = x * l``:

    * ``dL/du = g W`` (one GEMM, shared by both gradients below);
    * ``dx = (g W) * l`` and ``dl_k = sum_m (g W)_mk x_mk``: on Triton one GEMM whose
      epilogue makes both (``kernels/ia3_train.py``), ``g W`` never written;
    * ``dW = g^T u``, ``db = sum_m g`` when the base is unfrozen.

    Products with ``l`` and the reduction for ``dl`` run in fp32.
    """
    x, weight, bias, ia3_l = ctx.saved_tensors
    need = _Grads(*ctx.needs_input_grad)
    g = rows(grad_y)
    x2 = rows(x)
    l32 = ia3_l.float()
    d = {}
    if ctx.scale_input:
        if (need.x or need.ia3_l) and ctx.use_triton:
            dx, dl = _ia3_grad_in_op(g, weight, x, ia3_l, need.x, need.ia3_l)
            if need.x:
                d["x"] = dx.reshape(x.shape)
            if need.ia3_l:
                d["ia3_l"] = dl.to(ia3_l.dtype)
        elif need.x or need.ia3_l:
            g_u = (g @ weight).float()  # (M, K)
            if need.x:
                d["x"] = (g_u * l32).to(x.dtype).reshape(x.shape)
            if need.ia3_l:
                d["ia3_l"] = (g_u * x2.float()).sum(0).to(ia3_l.dtype)
        if need.weight:
            u = (x2.float() * l32).to(x.dtype)
            d["weight"] = (g.t() @ u).to(weight.dtype)
        if need.bias:
            d["bias"] = g.float().sum(0).to(bias.dtype)
    else:
        fused_dx = need.x and ctx.use_triton
        if fused_dx:  # through the op itself, so that torch.compile traces it too
            d["x"] = _ia3_linear_op(grad_y, weight.t(), None, ia3_l, True, True).reshape(x.shape)
        g_h = (g.float() * l32).to(g.dtype) if (need.x and not fused_dx) or need.weight or need.bias else None
        if need.x and not fused_dx:
            d["x"] = (g_h @ weight).reshape(x.shape)
        if need.ia3_l:
            h = F.linear(x2, weight, bias).float()
            d["ia3_l"] = (g.float() * h).sum(0).to(ia3_l.dtype)
        if need.weight:
            d["weight"] = (g_h.t() @ x2).to(weight.dtype)
        if need.bias:
            d["bias"] = g_h.float().sum(0).to(bias.dtype)
    return _Grads(**d)


_ia3_linear_op.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


@torch.library.custom_op("fastpeft::ia3_grad_input_scaling", mutates_args=())
def _ia3_grad_in_op(
    g: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, ia3_l: torch.Tensor, need_dx: bool, need_dl: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx (M, K), dl (K,) fp32)`` of the input-scaling form (empty when not needed): a
    custom op so that ``torch.compile`` traces the backward that calls it."""
    dx, dl = _ia3_train_kernels.ia3_grad_input_scaling(g, weight, x, ia3_l, need_dx, need_dl)
    return (dx if dx is not None else g.new_empty(0)), (dl if dl is not None else g.new_empty(0))


@_ia3_grad_in_op.register_fake
def _(g, weight, x, ia3_l, need_dx, need_dl):
    K = weight.shape[1]
    return (g.new_empty((g.shape[0], K), dtype=x.dtype) if need_dx else g.new_empty(0),
            g.new_empty((K,), dtype=torch.float32) if need_dl else g.new_empty(0))


def ia3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused (IA)^3 linear, differentiable.

    * ``scale_input=False`` (attention k/v): ``y = (x W^T + b) * l``, ``l`` with N entries
      (PEFT's ``(N, 1)``);
    * ``scale_input=True`` (feed-forward modules): ``y = (x * l) W^T + b``, ``l`` with K
      entries (PEFT's ``(1, K)``).

    Shapes: ``x (..., K)``, ``weight (N, K)``, ``bias (N,)``. ``l`` may be 1-D or PEFT's 2-D
    shape; its gradient comes back in the shape given. ``backend``: ``"auto"``,
    ``"triton"`` or ``"torch"``.
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias, ia3_l = autocast_cast(autocast_dtype(x.device), x, weight, bias, ia3_l)
    check_linear_input(x, weight, "ia3_linear")
    N, K = weight.shape
    want = K if scale_input else N
    shape_ok = isinstance(ia3_l, torch.Tensor) and ia3_l.numel() == want and (
        ia3_l.dim() == 1 or (ia3_l.dim() == 2 and ((1, K) if scale_input else (N, 1)) == tuple(ia3_l.shape))
    )
    if not shape_ok:
        got = tuple(ia3_l.shape) if isinstance(ia3_l, torch.Tensor) else type(ia3_l).__name__
        form = f"(1, {K}) or ({K},) for input scaling" if scale_input else f"({N}, 1) or ({N},) for output scaling"
        raise ValueError(f"ia3_l must have shape {form}, got {got}")
    check_adapter_tensors(x, "ia3_linear", ia3_l=ia3_l)
    check_bias(bias, weight, x, "ia3_linear")
    return ia3_linear_unchecked(x, weight, bias, ia3_l, bool(scale_input), backend)


def ia3_linear_unchecked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    ia3_l: torch.Tensor,
    scale_input: bool,
    backend: str,
) -> torch.Tensor:
    """:func:`ia3_linear` for callers that guarantee shapes, dtypes and devices (a layer
    with its own vectors and a checked ``x``, outside autocast): no second round of
    checks, and with neither autograd nor a trace to serve, the kernel launched directly
    (the custom-op dispatcher costs more host time than the kernel at decode)."""
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and eager_inference(x, weight, bias, ia3_l):
        return _ia3_kernels.ia3_linear_fwd(x, weight, bias, ia3_l, scale_input)
    return _ia3_linear_op(x, weight, bias, ia3_l.reshape(-1), scale_input, use_triton)
