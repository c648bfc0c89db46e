"""The LoRA forward's library-GEMM floor: the tuner's candidate that no tile may lose to.

Math (PEFT layout, ``W: (N, K)``, ``B: (N, r)``, ``xa = x_l A^T: (M, r)``)::

    y = x W^T + b            the library GEMM (cuBLAS on CUDA), written into y
    y += s * xa B^T          in place: one skinny GEMM accumulated into y

A tiled Triton GEMM can trail cuBLAS by more than the extra pass over ``y`` costs, so the
tuner times this beside the fused tiles (:data:`autotune.LIBRARY_GEMM`).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["library_lora"]


def library_lora(
    *,
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    xa: Optional[torch.Tensor],
    scaling: float,
    y: torch.Tensor,
) -> None:
    """``y = x2 W^T + b + s * xa B^T`` into ``y`` (``(M, N)``); ``lora_B`` None: the base
    alone. An ``xa`` kept in fp32 (``runtime.lora_in_fp32``: fp32 adapters on a 16-bit
    base) adds its fp32 product to the rounded base output, as PEFT's unfused layer does."""
    if bias is None:
        torch.mm(x2, weight.t(), out=y)
    else:
        torch.addmm(bias, x2, weight.t(), out=y)
    if lora_B is None:
        return
    b_t = lora_B.to(xa.dtype).t()
    if xa.dtype == y.dtype:
        y.addmm_(xa, b_t, alpha=scaling)
    else:
        y.add_(torch.mm(xa, b_t), alpha=scaling)
