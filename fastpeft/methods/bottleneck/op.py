"""Bottleneck adapters' op: ``y = h + s * (f(h Wd^T + bd) Wu^T + bu)``, ``h = x W^T + b``,
fused, with autograd.

``bottleneck_linear`` validates its inputs, picks a backend (``fastpeft.core.dispatch``)
and calls the custom op ``fastpeft::bottleneck_linear`` registered with
``torch.library``: a fake (meta) implementation for ``torch.compile`` and an autograd
formula whose backward uses PyTorch ops.
"""
from __future__ import annotations

import math
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
from fastpeft.kernels import bottleneck as _bn_kernels
from fastpeft.kernels.reference import bottleneck_activation_ref, bottleneck_linear_ref
from fastpeft.methods.bottleneck.config import check_activation

__all__ = ["bottleneck_linear", "bottleneck_linear_unchecked", "bottleneck_down_eff"]


def bottleneck_down_eff(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W_eff, b_eff) = (Wd W, Wd b + bd)``: see :mod:`fastpeft.kernels.bottleneck`.

    Detached (the op's backward never differentiates through them). A module whose
    weights do not change between calls computes them once and passes them in.
    """
    return _bn_kernels.bottleneck_down_eff(weight, bias, down_w, down_b)


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``f'(z)`` in ``z``'s dtype.

    relu: ``1[z > 0]``; gelu (erf form): ``Phi(z) + z phi(z)``; silu: ``sigma(z) (1 + z (1 -
    sigma(z)))``; tanh: ``1 - tanh(z)^2``.
    """
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if activation in ("silu", "swish"):
        sg = torch.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))
    t = torch.tanh(z)
    return 1.0 - t * t


@torch.library.custom_op("fastpeft::bottleneck_linear", mutates_args=())
def _bottleneck_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float,
    activation: str,
    w_eff: Optional[torch.Tensor],
    b_eff: Optional[torch.Tensor],
    use_triton: bool,
) -> torch.Tensor:
    if not use_triton:
        return bottleneck_linear_ref(x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation)
    return _bn_kernels.bottleneck_linear_fwd(
        x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation, w_eff=w_eff, b_eff=b_eff
    )


@_bottleneck_linear_op.register_fake
def _(x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation, w_eff, b_eff, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _Grads(NamedTuple):
    """One entry per input of the op: its gradient, or (``ctx.needs_input_grad``)
    whether it is needed."""

    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    down_w: Optional[torch.Tensor] = None
    down_b: Optional[torch.Tensor] = None
    up_w: Optional[torch.Tensor] = None
    up_b: Optional[torch.Tensor] = None
    scaling: None = None
    activation: None = None
    w_eff: None = None
    b_eff: None = None
    use_triton: None = None


def _bottleneck_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation, _, _, _ = inputs
    ctx.scaling = scaling
    ctx.activation = activation
    ctx.save_for_backward(x, weight, bias, down_w, down_b, up_w, up_b)


def _pre_activation(x2, weight, bias, down_w, down_b) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(z, h, w_eff)``: ``z = h Wd^T + bd`` in fp32, recomputed through ``h = x W^T + b``
    (returned) or through ``W_eff = Wd W`` (returned), whichever costs less."""
    M, N, D = x2.shape[0], weight.shape[0], down_w.shape[0]
    wd = down_w.to(x2.dtype)
    h = w_eff = None
    if M * N <= D * (M + N):
        h = F.linear(x2, weight, bias)
        z = F.linear(h, wd).float()
    else:
        w_eff = wd @ weight  # (D, K)
        z = F.linear(x2, w_eff).float()
        if bias is not None:
            z = z + (down_w.float() @ bias.float())
    if down_b is not None:
        z = z + down_b.float()
    return z, h, w_eff


def _bottleneck_backward(ctx, grad_y: torch.Tensor) -> _Grads:
    """Gradients of the bottleneck linear (``g = dL/dy``, rows flattened to ``(M, .)``)::

        h = x W^T + b,   z = h Wd^T + bd,   a = f(z),   y = h + s (a Wu^T + bu)

    * ``dWu = s g^T a`` (N, D) and ``dbu = s sum_m g``;
    * ``g_z = (s g Wu) * f'(z)`` (M, D), the gradient reaching ``z``; ``dbd = sum_m g_z``;
    * ``dWd = g_z^T h`` (D, N). ``h`` is not kept by the fused forward; by linearity
      ``g_z^T h = (g_z^T x) W^T + (sum_m g_z) b^T``, which costs ``D K (M + N)`` instead
      of recomputing ``h`` (``M N K``); the cheaper of the two is used;
    * ``dh = g + g_z Wd``, so ``dx = dh W = g W + g_z (Wd W)``: the second term uses the
      small ``(D, K)`` product ``W_eff = Wd W``, never an ``(M, N)`` temporary;
    * ``dW = dh^T x`` and ``db = sum_m dh`` only when the user unfroze the base.

    ``z`` and ``a`` are recomputed (a skinny ``(M, D)`` GEMM). GEMMs run in the input
    dtype (fp32 accumulation inside the GEMM, as autograd of the unfused form does);
    the element-wise ``(M, D)`` work and every reduction run in fp32.
    """
    x, weight, bias, down_w, down_b, up_w, up_b = ctx.saved_tensors
    need = _Grads(*ctx.needs_input_grad)
    s = ctx.scaling
    dt = x.dtype
    g = rows(grad_y)
    x2 = rows(x)
    wd = down_w.to(dt)
    z, h, w_eff = _pre_activation(x2, weight, bias, down_w, down_b)
    a = bottleneck_activation_ref(z, ctx.activation)
    d = {}
    if need.up_w:
        d["up_w"] = ((g.t() @ a.to(dt)) * s).to(up_w.dtype)
    if need.up_b:
        d["up_b"] = (g.float().sum(0) * s).to(up_b.dtype)
    g_z = (g @ up_w.to(dt)).float() * s * _activation_grad(z, ctx.activation)  # (M, D) fp32
    g_z_lp = g_z.to(dt)
    if need.down_b:
        d["down_b"] = g_z.sum(0).to(down_b.dtype)
    if need.down_w:
        if h is not None:
            d_dw = (g_z_lp.t() @ h).float()
        else:
            d_dw = ((g_z_lp.t() @ x2) @ weight.t()).float()
            if bias is not None:
                d_dw = d_dw + torch.outer(g_z.sum(0), bias.float())
        d["down_w"] = d_dw.to(down_w.dtype)
    if need.x:
        if w_eff is None:
            w_eff = wd @ weight
        d["x"] = ((g @ weight) + g_z_lp @ w_eff).to(x.dtype).reshape(x.shape)
    if need.weight or need.bias:
        dh = g + g_z_lp @ wd
        if need.weight:
            d["weight"] = (dh.t() @ x2).to(weight.dtype)
        if need.bias:
            d["bias"] = dh.float().sum(0).to(bias.dtype)
    return _Grads(**d)


_bottleneck_linear_op.register_autograd(_bottleneck_backward, setup_context=_bottleneck_setup_context)


def bottleneck_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    down_w: torch.Tensor,
    down_b: Optional[torch.Tensor],
    up_w: torch.Tensor,
    up_b: Optional[torch.Tensor],
    scaling: float = 1.0,
    activation: str = "relu",
    *,
    w_eff: Optional[torch.Tensor] = None,
    b_eff: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Linear layer with a bottleneck adapter on its output, fused, differentiable::

        h = x W^T + b;   y = h + s * (f(h Wd^T + bd) Wu^T + bu)

    Shapes: ``x (..., K)``, ``weight (N, K)``, ``bias (N,)``, ``down_w (D, N)``,
    ``down_b (D,)``, ``up_w (N, D)``, ``up_b (N,)``. ``activation``: relu, gelu, silu,
    swish or tanh. ``w_eff``/``b_eff``: optional precomputed
    :func:`bottleneck_down_eff` of these very weights (a cache the caller keeps valid).
    ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if amp is not None:
        x, weight, bias, down_w, down_b, up_w, up_b = autocast_cast(amp, x, weight, bias, down_w, down_b, up_w, up_b)
        w_eff = b_eff = None  # a caller's cache holds the weights' own dtype
    check_linear_input(x, weight, "bottleneck_linear")
    activation = check_activation(activation)
    N, K = weight.shape
    if down_w.dim() != 2 or down_w.shape[1] != N or down_w.shape[0] < 1:
        raise ValueError(f"down_w must have shape (bottleneck_size, {N}), got {tuple(down_w.shape)}")
    D = down_w.shape[0]
    if up_w.shape != (N, D):
        raise ValueError(f"up_w must have shape ({N}, {D}), got {tuple(up_w.shape)}")
    check_bias(bias, weight, x, "bottleneck_linear")
    for name, t, n in (("down_b", down_b, D), ("up_b", up_b, N)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    check_adapter_tensors(x, "bottleneck_linear", down_w=down_w, up_w=up_w, down_b=down_b, up_b=up_b)
    # An adapter kept in fp32 on a half-precision model (autocast_adapter_dtype) runs in
    # the input's dtype; autograd hands its gradients back in fp32.
    down_w, down_b, up_w, up_b = (None if t is None else t.to(x.dtype) for t in (down_w, down_b, up_w, up_b))
    if (w_eff is None) != (b_eff is None):
        raise ValueError("pass both w_eff and b_eff (from bottleneck_down_eff), or neither")
    if w_eff is not None and (w_eff.shape != (D, K) or b_eff.shape != (D,)):
        raise ValueError(
            f"w_eff/b_eff must have shapes ({D}, {K}) and ({D},), got {tuple(w_eff.shape)} and {tuple(b_eff.shape)}"
        )
    return bottleneck_linear_unchecked(
        x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation,
        None if w_eff is None else w_eff.detach(), None if b_eff is None else b_eff.detach(), backend,
    )


def bottleneck_linear_unchecked(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], down_w: torch.Tensor,
    down_b: Optional[torch.Tensor], up_w: torch.Tensor, up_b: Optional[torch.Tensor], scaling: float,
    activation: str, w_eff: Optional[torch.Tensor], b_eff: Optional[torch.Tensor], backend: str,
) -> torch.Tensor:
    """:func:`bottleneck_linear` for callers that guarantee what it checks (a layer with
    its own adapter, a checked ``x``, the adapter's tensors already in ``x``'s dtype, a
    canonical activation name, detached ``w_eff``/``b_eff``, no autocast): with neither
    autograd nor a trace to serve, the kernel is launched directly (the custom-op
    dispatcher costs more host time than the kernel at decode)."""
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and eager_inference(x, weight, bias, down_w, down_b, up_w, up_b):
        return _bn_kernels.bottleneck_linear_fwd(
            x, weight, bias, down_w, down_b, up_w, up_b, float(scaling), activation, w_eff=w_eff, b_eff=b_eff
        )
    return _bottleneck_linear_op(
        x, weight, bias, down_w, down_b, up_w, up_b, float(scaling), activation, w_eff, b_eff, use_triton
    )
