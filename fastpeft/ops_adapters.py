"""Op layer of the (IA)^3 and bottleneck adapters: validation, dispatch, autograd.

``ia3_linear`` and ``bottleneck_linear`` are the functional entry points. Each validates
its inputs, picks a backend with :func:`fastpeft.ops.resolve_backend` and calls a custom
op registered with ``torch.library`` (``fastpeft::ia3_linear``,
``fastpeft::bottleneck_linear``): a fake (meta) implementation for ``torch.compile`` and
an autograd formula whose backward uses PyTorch ops. Gradients flow to ``x`` and to the
adapter parameters; the frozen base gets gradients only when the user unfroze it.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastpeft.kernels import bottleneck as _bn_kernels
from fastpeft.kernels import ia3 as _ia3_kernels
from fastpeft.kernels.reference import (
    bottleneck_activation_ref,
    bottleneck_linear_ref,
    ia3_linear_ref,
)
from fastpeft.ops import (
    autocast_cast,
    autocast_dtype,
    check_adapter_tensors,
    check_bias,
    check_linear_input,
    resolve_backend,
)

__all__ = [
    "ACTIVATIONS",
    "ia3_linear",
    "bottleneck_linear",
    "bottleneck_down_eff",
    "check_activation",
]

# Names accepted for the bottleneck non-linearity (swish is silu).
ACTIVATIONS = tuple(_bn_kernels.ACTIVATIONS)


def check_activation(activation: str) -> str:
    """Return ``activation`` lower-cased, or raise naming the accepted ones."""
    if not isinstance(activation, str) or activation.lower() not in _bn_kernels.ACTIVATIONS:
        raise ValueError(
            f"unknown non-linearity {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    return activation.lower()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ===================================================================== (IA)^3


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


def _ia3_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, ia3_l, scale_input, _ = inputs
    ctx.scale_input = scale_input
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, ia3_l)


def _ia3_backward(ctx, grad_y: torch.Tensor):
    """Gradients of (IA)^3 (``g = dL/dy``, rows of ``x`` flattened to ``(M, K)``).

    Output scaling, ``y = h * l`` with ``h = x W^T + b`` and ``l`` of N entries:

    * ``dL/dh = g * l`` (broadcast over rows), so ``dx = (g * l) W``;
    * ``dl_n = sum_m g_mn h_mn``: ``h`` is recomputed (one GEMM) rather than saved, so
      the forward keeps no ``(M, N)`` activation;
    * ``dW = (g * l)^T x``, ``db = sum_m (g * l)`` when the base is unfrozen.

    Input scaling, ``y = (x * l) W^T + b`` with ``l`` of K entries, ``u = x * l``:

    * ``dL/du = g W`` (one GEMM, shared by both gradients below);
    * ``dx = (g W) * l`` and ``dl_k = sum_m (g W)_mk x_mk``;
    * ``dW = g^T u``, ``db = sum_m g`` when the base is unfrozen.

    Products with ``l`` and the reduction for ``dl`` run in fp32.
    """
    x, weight, bias, ia3_l = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = _rows(grad_y)
    x2 = _rows(x)
    l32 = ia3_l.float()
    d_x = d_w = d_b = d_l = None
    if ctx.scale_input:
        if need[0] or need[3]:
            g_u = (g @ weight).float()  # (M, K)
            if need[0]:
                d_x = (g_u * l32).to(x.dtype).reshape(x.shape)
            if need[3]:
                d_l = (g_u * x2.float()).sum(0).to(ia3_l.dtype)
        if need[1]:
            u = (x2.float() * l32).to(x.dtype)
            d_w = (g.t() @ u).to(weight.dtype)
        if need[2]:
            d_b = g.float().sum(0).to(bias.dtype)
    else:
        g_h = (g.float() * l32).to(g.dtype)  # dL/dh
        if need[0]:
            d_x = (g_h @ weight).reshape(x.shape)
        if need[3]:
            h = F.linear(x2, weight, bias).float()
            d_l = (g.float() * h).sum(0).to(ia3_l.dtype)
        if need[1]:
            d_w = (g_h.t() @ x2).to(weight.dtype)
        if need[2]:
            d_b = g_h.float().sum(0).to(bias.dtype)
    return d_x, d_w, d_b, d_l, None, None


_ia3_linear_op.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


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
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    return _ia3_linear_op(x, weight, bias, ia3_l.reshape(-1), bool(scale_input), use_triton)


# ===================================================================== bottleneck


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


def _bottleneck_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, down_w, down_b, up_w, up_b, scaling, activation, _, _, _ = inputs
    ctx.scaling = scaling
    ctx.activation = activation
    ctx.has = (bias is not None, down_b is not None, up_b is not None)
    ctx.save_for_backward(x, weight, bias, down_w, down_b, up_w, up_b)


def _bottleneck_backward(ctx, grad_y: torch.Tensor):
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
    need = ctx.needs_input_grad
    s = ctx.scaling
    dt = x.dtype
    N, K = weight.shape
    D = down_w.shape[0]
    g = _rows(grad_y)
    x2 = _rows(x)
    M = x2.shape[0]
    wd = down_w.to(dt)
    recompute_h = M * N <= D * (M + N)
    h = w_eff = None
    if recompute_h:
        h = F.linear(x2, weight, bias)
        z = F.linear(h, wd).float()
    else:
        w_eff = wd @ weight  # (D, K)
        z = F.linear(x2, w_eff).float()
        if bias is not None:
            z = z + (down_w.float() @ bias.float())
    if down_b is not None:
        z = z + down_b.float()
    a = bottleneck_activation_ref(z, ctx.activation)
    d_x = d_w = d_b = d_dw = d_db = d_uw = d_ub = None
    if need[5]:
        d_uw = ((g.t() @ a.to(dt)) * s).to(up_w.dtype)
    if need[6]:
        d_ub = (g.float().sum(0) * s).to(up_b.dtype)
    g_z = (g @ up_w.to(dt)).float() * s * _activation_grad(z, ctx.activation)  # (M, D) fp32
    g_z_lp = g_z.to(dt)
    if need[4]:
        d_db = g_z.sum(0).to(down_b.dtype)
    if need[3]:
        if h is not None:
            d_dw = (g_z_lp.t() @ h).float()
        else:
            d_dw = ((g_z_lp.t() @ x2) @ weight.t()).float()
            if bias is not None:
                d_dw = d_dw + torch.outer(g_z.sum(0), bias.float())
        d_dw = d_dw.to(down_w.dtype)
    if need[0]:
        if w_eff is None:
            w_eff = wd @ weight
        d_x = ((g @ weight) + g_z_lp @ w_eff).to(x.dtype).reshape(x.shape)
    if need[1] or need[2]:
        dh = g + g_z_lp @ wd
        if need[1]:
            d_w = (dh.t() @ x2).to(weight.dtype)
        if need[2]:
            d_b = dh.float().sum(0).to(bias.dtype)
    return d_x, d_w, d_b, d_dw, d_db, d_uw, d_ub, None, None, None, None, None


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
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    return _bottleneck_linear_op(
        x, weight, bias, down_w, down_b, up_w, up_b, float(scaling), activation,
        None if w_eff is None else w_eff.detach(), None if b_eff is None else b_eff.detach(), use_triton,
    )
