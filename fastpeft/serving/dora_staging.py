"""DoRA adapters in the serving pool: each layer's magnitude vector becomes a column scale.

A DoRA layer computes ``y = c * (x W^T + s (x A^T) B^T) + b`` with
``c = m / ||W + s B A||`` (one norm per output row, ``fastpeft.methods.lora.dora``). The
pool keeps ``c`` per slot and layer (ones for a LoRA slot), computed when the adapter is
staged from the layer's base weight ``W`` as it is then (a base weight changed later,
e.g. by a merge, calls for loading the adapter again), and the mixed kernel applies the
row's ``c`` in its epilogue.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from fastpeft.methods.lora.dora import dora_scale, dora_weight_norm

__all__ = ["check_dora_config", "magnitude_scale"]


def check_dora_config(name: str, use_dora: Optional[bool], has_magnitude: bool, path: str, AdapterError) -> None:
    """A config that says ``use_dora`` needs a magnitude vector for every layer, and one
    that says plain LoRA none (``use_dora`` None: no config, the tensors decide)."""
    if use_dora and not has_magnitude:
        raise AdapterError(f"adapter {name!r}: the config says use_dora=True but layer {path!r} has no "
                           "lora_magnitude_vector: the config and the weights do not belong together")
    if use_dora is False and has_magnitude:
        raise AdapterError(f"adapter {name!r}: layer {path!r} has a DoRA lora_magnitude_vector but the config "
                           "says use_dora=False: the config and the weights do not belong together")


def magnitude_scale(
    where: str, magnitude: Any, A: torch.Tensor, B: torch.Tensor, scaling: float, module: Optional[nn.Module],
    AdapterError,
) -> torch.Tensor:
    """``c = m / ||W + s B A||`` (``(N,)`` fp32 on the slots' device) for one layer of a
    DoRA adapter, after checking ``m``: a finite 1-D tensor with one entry per output
    feature. ``module``: the pool's ``FastLoRALinear`` (its base weight)."""
    if module is None:
        raise AdapterError(f"{where}: a DoRA adapter needs the base weights for its norms; build the pool over "
                           "the model (AdapterPool(model, ...)), not over layer shapes")
    N = B.shape[0]
    if not isinstance(magnitude, torch.Tensor) or tuple(magnitude.shape) != (N,):
        got = tuple(magnitude.shape) if isinstance(magnitude, torch.Tensor) else type(magnitude).__name__
        raise AdapterError(f"{where}: lora_magnitude_vector must have shape ({N},) (one entry per output "
                           f"feature), got {got}")
    m = magnitude.detach().to(device=A.device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise AdapterError(f"{where}: lora_magnitude_vector holds NaN or inf")
    with torch.no_grad():
        norm = dora_weight_norm(module.base_weight(), A, B, scaling, module.backend)
    return dora_scale(m, norm).contiguous()
