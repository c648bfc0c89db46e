"""The one dispatch point: which backend runs an op, autocast, and the input checks.

Every op of every method asks :func:`resolve_backend` whether the Triton kernels or the
PyTorch reference run (Triton for CUDA tensors, and for CPU tensors under
``TRITON_INTERPRET=1``; the reference otherwise, and wherever ``backend="torch"`` is
forced), casts under ``torch.autocast`` as ``nn.Linear`` is cast (:func:`autocast_cast`),
and validates its inputs with the checks below, so every op refuses bad input with the
same messages.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from fastpeft.kernels import runtime as _runtime

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "Backend",
    "BACKENDS",
    "KERNEL_DTYPES",
    "resolve_backend",
    "autocast_dtype",
    "autocast_cast",
    "eager_inference",
    "rows",
    "check_linear_input",
    "check_bias",
    "check_adapter_tensors",
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
    # The interpreter probe itself is in the key: whoever replaces it gets fresh answers.
    key = (backend, device.type, dtype, _runtime.interpreter_active)
    found = _RESOLVED.get(key)
    if found is not None:
        return found
    found = _resolve(backend, device, dtype)
    _RESOLVED[key] = found
    return found


# (backend, device type, dtype, probe) -> backend: the answer never changes within a
# process (the interpreter flag is read at import), and every forward asks.
_RESOLVED: dict = {}


def _resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """:func:`resolve_backend` itself (raises where it must; only answers are kept)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device_ok = device.type == "cuda" or (device.type == "cpu" and _runtime.interpreter_active())
    dtype_ok = dtype is None or dtype in KERNEL_DTYPES
    interpretable = dtype != torch.bfloat16 or not _runtime.interpreter_active()
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
        _runtime.check_interpretable(dtype)
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


def eager_inference(*tensors: Optional[torch.Tensor]) -> bool:
    """True when neither autograd nor a torch.compile trace needs a custom op: an op
    may then launch its kernel directly, skipping the dispatcher (tens of microseconds,
    more than the kernel itself at M = 1)."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its leading dims flattened: ``(M, last)``."""
    return t.reshape(-1, t.shape[-1])
