"""Op layer: the one dispatch point between the Triton kernels and the reference.

``lora_linear`` is the functional entry point. It validates its inputs, picks a backend
and calls the custom op ``fastpeft::lora_linear``, which is registered with
``torch.library`` so that ``torch.compile`` traces through models that use it without
graph breaks, and which carries its own autograd formula.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from fastpeft.kernels import lora as _kernels
from fastpeft.kernels.reference import lora_linear_ref

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "Backend",
    "BACKENDS",
    "resolve_backend",
    "lora_linear",
    "lora_linear_unchecked",
    "check_linear_input",
    "check_bias",
    "check_adapter_tensors",
    "KERNEL_DTYPES",
    "autocast_dtype",
    "autocast_cast",
]


#: Input dtypes the Triton kernels take (fp32 accumulation inside).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Map ``"auto" | "triton" | "torch"`` to the backend that runs on ``device`` for
    inputs of ``dtype`` (None: a kernel dtype).

    ``auto`` takes Triton for CUDA tensors, and for CPU tensors when the Triton
    interpreter is on (``TRITON_INTERPRET=1``), in fp32, fp16 and bf16; the reference
    otherwise (float64 runs there, as ``nn.Linear`` does). The interpreter's ``tl.dot``
    has no bf16, so under it bf16 runs on the reference too. Forcing ``"triton"`` where
    Triton cannot run, or would compute wrong numbers, is an error, never a silent
    fallback. Every op (LoRA, mixed-adapter LoRA, (IA)^3, bottleneck) dispatches here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_ok = device.type == "cuda" or (device.type == "cpu" and _kernels.interpreter_active())
    dtype_ok = dtype is None or dtype in KERNEL_DTYPES
    interpretable = dtype != torch.bfloat16 or not _kernels.interpreter_active()
    if backend == "auto":
        return "triton" if device_ok and dtype_ok and interpretable else "torch"
    if backend == "triton" and not device_ok:
        raise RuntimeError(
            f"backend='triton' cannot run on a {device.type} tensor: use a CUDA device, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, "
            "or pass backend='torch'"
        )
    if backend == "triton" and not dtype_ok:
        raise TypeError(
            f"backend='triton' runs fp32, fp16 and bf16 inputs, got {dtype}; "
            "pass backend='torch' (or 'auto') for it"
        )
    if backend == "triton":
        _kernels.check_interpretable(dtype)
    return backend


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs linear layers in on ``device``; None when off."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_cast(dtype: Optional[torch.dtype], *tensors: Optional[torch.Tensor]) -> tuple:
    """``tensors`` in ``dtype`` (floating ones; None and others as they are), as autocast
    casts ``nn.Linear``'s operands; everything unchanged when ``dtype`` is None."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t for t in tensors
    )


def check_bias(bias: Optional[torch.Tensor], weight: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """A bias the kernels can read: ``(N,)``, floating, on ``x``'s device."""
    if bias is None:
        return
    N = weight.shape[0]
    if not isinstance(bias, torch.Tensor) or bias.shape != (N,) or not bias.is_floating_point():
        got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{what}: bias must be a floating tensor of shape ({N},), got {got}")
    if bias.device != x.device:
        raise RuntimeError(f"{what}: bias is on {bias.device} but the input is on {x.device}; move one of them")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{what}: bias is {bias.dtype} but the weight is {weight.dtype}; keep them in one dtype")


def check_adapter_tensors(x: torch.Tensor, what: str, **tensors: Optional[torch.Tensor]) -> None:
    """Adapter tensors the ops can run: floating-point, on ``x``'s device (their dtype
    may differ from ``x``'s: an fp32 adapter on a half model is cast at the op)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{what}: {name} must be a floating-point tensor, got {got}")
        if t.device != x.device:
            raise RuntimeError(f"{what}: {name} is on {t.device} but the input is on {x.device}; move one of them")


def check_linear_input(x: torch.Tensor, weight: torch.Tensor, what: str = "layer", check_dtype: bool = True) -> None:
    """Raise a clear error when ``x`` does not fit a linear layer with ``weight`` (N, K)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor input, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{what} expects input with last dimension {weight.shape[1]} (in_features), "
            f"got input of shape {tuple(x.shape)}"
        )
    if check_dtype and x.dtype != weight.dtype:
        raise TypeError(
            f"{what} has dtype {weight.dtype} but the input is {x.dtype}; cast the input "
            f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype}))"
        )
    if x.device != weight.device:
        raise RuntimeError(
            f"{what} is on {weight.device} but the input is on {x.device}; move one of them"
        )


# --------------------------------------------------------------------- custom op


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


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
        xa = _kernels.lora_shrink(_rows(x_lora), lora_A)
    return _kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, xa=xa)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, x_lora, use_triton):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scaling, x_lora, use_triton = inputs
    ctx.scaling = scaling
    ctx.use_triton = use_triton
    ctx.has_x_lora = x_lora is not None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, x_lora)


def _backward(ctx, grad_y: torch.Tensor):
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
    need = ctx.needs_input_grad
    g = _rows(grad_y)
    x_l = _rows(x_lora if ctx.has_x_lora else x).to(lora_A.dtype)
    g_l = g.to(lora_B.dtype)
    g_a = (g_l @ lora_B) * s
    d_x = d_w = d_b = d_a = d_bm = d_xl = None
    if need[4]:
        d_bm = ((g_l.t() @ (x_l @ lora_A.t())) * s).to(lora_B.dtype)
    if need[3]:
        d_a = (g_a.t() @ x_l).to(lora_A.dtype)
    fused_dx = need[0] and ctx.use_triton and not ctx.has_x_lora
    d_lora_in = (g_a @ lora_A) if ((need[0] and not fused_dx) or need[6]) else None
    if fused_dx:
        # Through the custom op itself, so that torch.compile can trace the backward too.
        d_x = _lora_linear_op(grad_y, weight.t(), None, lora_B.t(), lora_A.t(), s, None, True).reshape(x.shape)
    elif need[0]:
        d_x = g @ weight
        if not ctx.has_x_lora:
            d_x = d_x + d_lora_in.to(d_x.dtype)
        d_x = d_x.reshape(x.shape)
    if need[6] and ctx.has_x_lora:
        d_xl = d_lora_in.to(x_lora.dtype).reshape(x_lora.shape)
    if need[1]:
        d_w = (g.t() @ _rows(x)).to(weight.dtype)
    if need[2]:
        d_b = g.sum(0)
    return d_x, d_w, d_b, d_a, d_bm, None, d_xl, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------- public


def _eager_inference(*tensors: Optional[torch.Tensor]) -> bool:
    """True when neither autograd nor a torch.compile trace needs the custom op."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


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
) -> torch.Tensor:
    """:func:`lora_linear` for callers that guarantee the shapes, dtypes and devices
    (a layer that built its own adapters and checked ``x``): no second round of checks
    on the decode path."""
    use_triton = resolve_backend(backend, x.device, x.dtype) == "triton"
    if use_triton and _eager_inference(x, weight, bias, lora_A, lora_B, x_lora):
        # Lean decode path: no autograd and no tracing, so skip the custom-op dispatcher
        # (tens of microseconds, more than the kernel itself at M = 1) and launch directly.
        return _triton_forward(x, weight, bias, lora_A, lora_B, float(scaling), x_lora)
    return _lora_linear_op(x, weight, bias, lora_A, lora_B, float(scaling), x_lora, use_triton)
