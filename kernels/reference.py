"""Pure-PyTorch reference of every fused op in fastpeft.

This module is the oracle for the tests and the CPU fallback of the op layer. It is
written for readability first: each function states the math of one fused kernel with
plain PyTorch ops, in the dtype of its inputs. Tests call it on float64 copies of the
inputs to get the "true" answer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["lora_linear_ref"]


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
        adapters' dtype (as PEFT's layers do) and is cast back to ``x``'s dtype.
    """
    base = F.linear(x, weight, bias)
    xl = x if x_lora is None else x_lora
    xl = xl.to(lora_A.dtype)
    update = F.linear(F.linear(xl, lora_A), lora_B) * scaling
    return base + update.to(base.dtype)
