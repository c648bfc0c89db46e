"""LoRA's op: the fused ``y = x W^T + b + s * (x_l A^T) B^T`` with its own autograd.

``lora_linear`` is the functional entry point. It validates its inputs, picks a backend
(``fastpeft.core.dispatch``) and calls the custom op ``fastpeft::lora_linear``, which is
registered with ``torch.library`` so that ``torch.compile`` traces through models that
use it without graph breaks, and which carries its own autograd formula.

Training on the Triton backend (``kernels/lora_train.py``): the forward keeps ``x``, the
``(M, r)`` shrink and, with dropout, a one-element seed (the mask is regenerated in the
backward kernels, never stored); the backward is the custom op
``fastpeft::lora_linear_backward`` (dS/dB from one read of ``dY``, ``dX`` in one GEMM,
``dA``), traceable as well.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

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
from fastpeft.kernels import lora_grad_dx as _dx_kernels
from fastpeft.kernels import lora_train as _train_kernels
from fastpeft.kernels.reference import lora_linear_parts_ref
from fastpeft.kernels.runtime import lora_in_fp32

__all__ = ["dropout_seed", "lora_linear", "lora_linear_unchecked"]


@torch.library.custom_op("fastpeft::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
    use_triton: bool,
    train: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)``: the output and, with ``train``, the shrink ``xa = D(x_l) A^T``
    (``(M, r)``) that the backward needs (an empty tensor otherwise)."""
    if not use_triton:
        y, xa = lora_linear_parts_ref(x, weight, bias, lora_A, lora_B, scaling, x_lora)
        return y, (rows(xa) if train else xa.new_empty(0))
    return _triton_forward(x, weight, bias, lora_A, lora_B, scaling, x_lora, dropout_p, seed, train)


def _triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: Optional[torch.Tensor],
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    train: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels. Inference without dropout: one launch (the shrink in the GEMM's
    K loop where the tuner prefers it). Training, dropout or a separate ``x_lora``: the
    dropout+shrink kernel makes ``xa`` (kept for the backward when ``train``), and the
    GEMM adds ``s * xa B^T`` in its epilogue."""
    if x_lora is None and dropout_p == 0.0 and not train:
        return _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling), x.new_empty(0)
    xa = _train_kernels.lora_dropout_shrink(x if x_lora is None else x_lora, lora_A, dropout_p, seed)
    y = _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, xa=xa)
    return y, (xa if train else xa.new_empty(0))


def _shrink_dtype(x_dtype: torch.dtype, adapter_dtype: torch.dtype, use_triton: bool) -> torch.dtype:
    """The dtype of ``xa``: the reference runs the branch in the adapters' dtype; the
    kernels in ``x``'s, or fp32 when ``lora_in_fp32``."""
    if not use_triton:
        return adapter_dtype
    return torch.float32 if lora_in_fp32(x_dtype, adapter_dtype) else x_dtype


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, x_lora, dropout_p, seed, use_triton, train):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    dtype = _shrink_dtype(x.dtype, lora_A.dtype, use_triton)
    m = x.numel() // x.shape[-1] if x.shape[-1] else math.prod(x.shape[:-1])
    return y, (x.new_empty((m, lora_A.shape[0]), dtype=dtype) if train else x.new_empty(0))


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
    dropout_p: None = None
    seed: None = None
    use_triton: None = None
    train: None = None


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, x_lora, dropout_p, seed, use_triton, train = inputs
    if not train:
        raise RuntimeError("fastpeft::lora_linear was called with train=False on inputs that need gradients")
    ctx.scaling, ctx.dropout_p, ctx.use_triton = scaling, dropout_p, use_triton
    ctx.mark_non_differentiable(output[1])
    # Only x (the base GEMM keeps it anyway), the (M, r) shrink and a one-element seed:
    # never the dropped-out input nor its mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], x_lora, seed)


def _backward(ctx, grad_y: torch.Tensor, _grad_xa: Optional[torch.Tensor]) -> _Grads:
    """Gradients of ``y = x W^T + b + s * xa B^T``, ``xa = D(x_l) A^T`` (rows flattened,
    ``g = dL/dy``, ``D`` the dropout: ``D(x) = keep * x / (1 - p)``, linear in ``x``).

    The chain rule through ``xa`` gives ``dL/dxa = s * g B =: dS``; then

    * ``dB = d/dB <g, s xa B^T> = s * g^T xa``          (N, r)
    * ``dA = dS^T D(x_l)``            (xa = D(x_l) A^T)  (r, K)
    * ``dx_l = D^T(dS A) = keep * (dS A) / (1 - p)``    (D is diagonal: its own transpose)
    * ``dx = g W + dx_l`` when ``x_l`` is ``x``, else ``g W`` and ``dx_lora = dS A``
    * ``db = sum_m g``, ``dW = g^T x``: only when the user unfroze them.

    Triton: ``dS``/``dB`` from one read of ``g``, ``dx`` in one GEMM (the dropout mask
    regenerated from the seed in its epilogue; the forward kernel over transposed views
    without dropout), ``dA`` with ``D(x)`` regenerated: all inside the custom op
    ``fastpeft::lora_linear_backward``, so that ``torch.compile`` traces the backward too.
    """
    x, weight, lora_A, lora_B, xa, x_lora, seed = ctx.saved_tensors
    s = ctx.scaling
    need = _Grads(*ctx.needs_input_grad)
    g = rows(grad_y)
    d = {}
    if ctx.use_triton:
        dx, dxl, da, db = _lora_backward_op(
            g, x, weight, lora_A, lora_B, xa, x_lora, seed, s, ctx.dropout_p,
            need.x, need.x_lora, need.lora_A, need.lora_B,
        )
        d.update(x=dx if need.x else None, x_lora=dxl if need.x_lora else None,
                 lora_A=da if need.lora_A else None, lora_B=db if need.lora_B else None)
    else:
        x_l = rows(x if x_lora is None else x_lora).to(lora_A.dtype)
        g_l = g.to(lora_B.dtype)
        ds = (g_l @ lora_B) * s
        if need.lora_B:
            d["lora_B"] = ((g_l.t() @ xa) * s).to(lora_B.dtype)
        if need.lora_A:
            d["lora_A"] = (ds.t() @ x_l).to(lora_A.dtype)
        if need.x:
            dx = g @ weight
            d["x"] = (dx if x_lora is not None else dx + (ds @ lora_A).to(dx.dtype)).reshape(x.shape)
        if need.x_lora:
            d["x_lora"] = (ds @ lora_A).to(x_lora.dtype).reshape(x_lora.shape)
    if need.weight:
        d["weight"] = (g.t() @ rows(x)).to(weight.dtype)
    if need.bias:
        d["bias"] = g.sum(0)
    return _Grads(**d)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastpeft::lora_linear_backward", mutates_args=())
def _lora_backward_op(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    x_lora: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    scaling: float,
    dropout_p: float,
    need_x: bool,
    need_x_lora: bool,
    need_A: bool,
    need_B: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_lora, dA, dB)`` on the Triton kernels (see :func:`_backward`); the
    gradients not asked for are empty tensors."""
    ds, db = _train_kernels.lora_grad_shrink(g, lora_B, xa, scaling, need_db=need_B)
    dx, dxl, da = g.new_empty(0), g.new_empty(0), g.new_empty(0)  # distinct: outputs may not alias
    if need_x and x_lora is None and dropout_p > 0.0:
        dx = _dx_kernels.lora_grad_dx(g, weight, ds, lora_A, dropout_p, seed).reshape(x.shape)
    elif need_x and x_lora is None:
        # dx = g W + (g s B) A: the forward's own form over transposed views (input g,
        # base W^T, xa = dS, up-projection A^T), one launch.
        dx = _kernels.lora_linear_fwd(g, weight.t(), None, lora_B.t(), lora_A.t(), 1.0, xa=ds).reshape(x.shape)
    elif need_x:
        dx = (g @ weight).reshape(x.shape)
    if need_x_lora and x_lora is not None:
        dxl = (ds @ lora_A.float()).to(x_lora.dtype).reshape(x_lora.shape)
    if need_A:
        da = _train_kernels.lora_grad_a(ds, x if x_lora is None else x_lora, lora_A.dtype, dropout_p, seed)
    return dx, dxl, da, (db if need_B else g.new_empty(0))


@_lora_backward_op.register_fake
def _(g, x, weight, lora_A, lora_B, xa, x_lora, seed, scaling, dropout_p, need_x, need_x_lora, need_A, need_B):
    return (
        x.new_empty(x.shape) if need_x else g.new_empty(0),
        x.new_empty(x.shape) if need_x_lora and x_lora is not None else g.new_empty(0),
        lora_A.new_empty(lora_A.shape) if need_A else g.new_empty(0),
        lora_B.new_empty(lora_B.shape) if need_B else g.new_empty(0),
    )


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A one-element int64 seed for the kernels' dropout, drawn from torch's RNG on
    ``device`` (so that ``torch.manual_seed`` and gradient checkpointing's RNG-state
    restore reproduce the mask; the tensor stays on the device: no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


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
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    *,
    shrink_copy: Optional[Callable[[], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """:func:`lora_linear` for callers that guarantee the shapes, dtypes and devices
    (a layer that built its own adapters and checked ``x``): no second round of checks
    on the decode path.

    ``dropout_p``/``seed`` (Triton backend only): dropout on the LoRA branch's input
    drawn inside the kernels from ``seed`` (:func:`dropout_seed`), instead of an
    ``x_lora`` made in PyTorch; the two are exclusive.

    ``shrink_copy``: where ``lora_A`` is fp32 on a 16-bit ``x``, returns ``lora_A`` in
    ``x``'s dtype (kept by the caller, rebuilt when ``A`` changes) or None where that
    would overflow; used on the no-autograd Triton path only (see
    ``fastpeft.kernels.lora.lora_linear_fwd``'s ``lora_A_lowp``), so gradients always
    reach the fp32 ``A`` itself.
    """
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if dropout_p > 0.0 and (not use_triton or seed is None or x_lora is not None):
        raise ValueError(
            "lora_linear: dropout_p > 0 needs the Triton backend and a seed (dropout_seed), and no x_lora; "
            "on the torch backend pass x_lora=dropout(x) instead"
        )
    if use_triton and eager_inference(x, weight, bias, lora_A, lora_B, x_lora):
        # Lean decode path: no autograd and no tracing, so skip the custom-op dispatcher
        # and launch directly.
        if x_lora is None and dropout_p == 0.0:
            lowp = None if shrink_copy is None or lora_A.dtype == x.dtype else shrink_copy()
            return _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, float(scaling), lora_A_lowp=lowp)
        return _triton_forward(x, weight, bias, lora_A, lora_B, float(scaling), x_lora, dropout_p, seed)[0]
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B, x_lora)
    )
    return _lora_linear_op(
        x, weight, bias, lora_A, lora_B, float(scaling), x_lora, float(dropout_p), seed, use_triton, train
    )[0]
