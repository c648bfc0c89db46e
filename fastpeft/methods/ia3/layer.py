"""``IA3Linear``: a drop-in ``nn.Linear`` with one or more (IA)^3 adapters.

(IA)^3 (Liu et al., 2022) learns one vector ``l`` per adapted layer, as PEFT defines it:

* ordinary targets (attention k/v): the output is scaled, ``y = (x W^T + b) * l``,
  ``l`` of shape ``(out_features, 1)``;
* feed-forward targets (``is_feedforward``): the input is scaled,
  ``y = (x * l) W^T + b``, ``l`` of shape ``(1, in_features)``.

``l`` is kept in PEFT's checkpoint shape, so ``ia3_l`` tensors load and save unchanged.
Each adapter is one :class:`IA3Adapter` module in ``adapters`` (``adapters.<name>.ia3_l``).
The forward of the active adapter is one call of the fused op
(``fastpeft.methods.ia3.op.ia3_linear``): the scale is applied in the GEMM's prologue or
epilogue, with no extra pass over ``x`` or ``y``. ``merge`` folds ``l`` into the base
weight (and, for output scaling, the bias) exactly as PEFT does.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.linear import AdapterLinear
from fastpeft.core.dispatch import autocast_dtype
from fastpeft.methods.ia3.op import ia3_linear, ia3_linear_unchecked

__all__ = ["IA3Adapter", "IA3Linear"]


class IA3Adapter(nn.Module):
    """One (IA)^3 adapter: the vector ``ia3_l`` in PEFT's shape, ``(1, in)`` (input
    scaling) or ``(out, 1)`` (output scaling); ``l = 1`` or, with ``init_ia3_weights=False``,
    ``l ~ N(0, 1)``, as PEFT initialises it."""

    def __init__(self, shape: Tuple[int, int], init_ia3_weights: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {init_ia3_weights!r}")
        if init_ia3_weights:
            l = torch.ones(shape, device=device, dtype=dtype)
        else:
            l = torch.randn(shape, device=device).to(dtype)
        self.ia3_l = nn.Parameter(l)


class IA3Linear(AdapterLinear):
    """Linear layer with (IA)^3 scaling vectors, fused into the GEMM.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (same order).
        is_feedforward: (keyword) scale the input (PEFT's ``feedforward_modules``) instead of
            the output.
        adapter_name: name of the first adapter.
        init_ia3_weights: True: ``l = 1`` (the layer equals its base, as PEFT); False:
            ``l ~ N(0, 1)`` (PEFT's non-default init, for tests).
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            PyTorch reference), ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        is_feedforward: bool = False,
        adapter_name: str = "default",
        init_ia3_weights: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        weight, b = self._new_linear_tensors(in_features, out_features, bias, device, dtype)
        self._setup((weight, b), is_feedforward, backend, fan_in_fan_out=False, base_cls=nn.Linear)
        self.add_adapter(adapter_name, init_ia3_weights)

    def _setup(self, parts, is_feedforward, backend, fan_in_fan_out, base_cls) -> None:
        self._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        self.is_feedforward = bool(is_feedforward)

    # ---------------------------------------------------------------- construction

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        is_feedforward: bool = False,
        *,
        adapter_name: str = "default",
        init_ia3_weights: bool = True,
        backend: str = "auto",
    ) -> "IA3Linear":
        """Wrap an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight ``(in, out)``; PEFT's
        ``fan_in_fan_out``, read through a transposed view): the new layer shares the
        module's weight and bias tensors (no copy)."""
        parts, fan_in_fan_out, base_cls = cls.base_parts(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(parts, is_feedforward, backend, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls)
        layer.add_adapter(adapter_name, init_ia3_weights)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args, **kwargs) -> "IA3Linear":
        """Wrap ``linear`` (arguments as :meth:`wrap`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.wrap(linear, *args, **kwargs)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, *args, **kwargs) -> "IA3Linear":
        """Wrap a transformers ``Conv1D`` (arguments as :meth:`wrap`)."""
        if isinstance(conv, nn.Linear):
            raise TypeError("from_conv1d expects a transformers Conv1D, got an nn.Linear (use from_linear)")
        return cls.wrap(conv, *args, **kwargs)

    @property
    def l_shape(self) -> tuple:
        """PEFT's shape of ``ia3_l`` for this layer: ``(1, in)`` or ``(out, 1)``."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    # ---------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add an adapter (active if none is): ``l = 1``, or ``N(0, 1)`` with
        ``init_ia3_weights=False``, as PEFT initialises it."""
        self._check_new_name(adapter_name)
        adapter = IA3Adapter(self.l_shape, init_ia3_weights, device=self.weight.device, dtype=self.weight.dtype)
        self._added(adapter_name, adapter)

    def load_vector(self, adapter_name: str, value: torch.Tensor) -> None:
        """Copy a checkpoint's ``ia3_l`` into an adapter, after checking its shape.

        Accepts PEFT's shape or a 1-D vector with as many entries. Bad input raises and
        leaves the layer unchanged.
        """
        self._require(adapter_name)
        want = self.l_shape
        if not isinstance(value, torch.Tensor) or (tuple(value.shape) != want and tuple(value.shape) != (math.prod(want),)):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            kind = "input scaling (feed-forward)" if self.is_feedforward else "output scaling"
            raise ValueError(f"ia3_l for this layer ({kind}) must have shape {want}, got {got}")
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before loading new values")
        with torch.no_grad():
            self.adapters[adapter_name].ia3_l.copy_(value.reshape(want))

    @property
    def ia3_vector(self) -> nn.Parameter:
        """``l`` of the active adapter, in PEFT's shape."""
        return self.adapters[self._active()].ia3_l

    # ---------------------------------------------------------------- merge

    def _check_mergeable(self, adapter_name: str) -> None:
        if not bool(torch.isfinite(self.adapters[adapter_name].ia3_l.detach()).all()):
            raise ValueError(f"cannot merge adapter {adapter_name!r}: ia3_l holds NaN or inf")

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], inverse: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W * l`` (rows for output scaling, columns for input scaling) and, for output
        scaling, ``b * l``; ``inverse`` divides. fp32 math, stored in the base dtypes, as
        new tensors."""
        l = self.adapters[adapter_name].ia3_l.detach().float().reshape(-1)
        if inverse:
            if bool((l == 0).any()):
                warnings.warn(
                    f"adapter {adapter_name!r} has zero entries in ia3_l: unmerge cannot restore the "
                    "weights it zeroed",
                    stacklevel=4,
                )
            l = torch.where(l == 0, torch.ones_like(l), 1.0 / l)
        w = weight.t() if self.fan_in_fan_out else weight  # (out, in) view
        scale = l[None, :] if self.is_feedforward else l[:, None]
        w = (w.float() * scale).to(weight.dtype)
        weight = w.t() if self.fan_in_fan_out else w
        if not self.is_feedforward and bias is not None:
            bias = (bias.float() * l).to(bias.dtype)
        return weight, bias

    def _undo_merge(self, adapter_name: str) -> None:
        self._write_base(*self._fold(adapter_name, self.weight.detach(), self.bias, inverse=True))

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.__dict__.get("_row_plan") is not None:
            return self._mixed_forward(x)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            # Base only, or an adapter already folded into the weights: cuBLAS.
            return F.linear(x, self.base_weight(), self.bias)
        return self._run(x, name)

    def _run(self, x: torch.Tensor, name: str) -> torch.Tensor:
        l = self.adapters[name].ia3_l
        if autocast_dtype(x.device) is None:  # x is checked and l is the layer's own
            return ia3_linear_unchecked(x, self.base_weight(), self.bias, l, self.is_feedforward, self.backend)
        return ia3_linear(x, self.base_weight(), self.bias, l, self.is_feedforward, backend=self.backend)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row (``x``'s dim 0) through its own adapter (the row plan); ``None``
        or a name this layer does not hold: the base only. One sub-batch per adapter."""
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first")
        return self._forward_by_row_groups(x, self._run)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, is_feedforward={self.is_feedforward}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, adapters={list(self.adapters)}, "
            f"active={self.active_adapter!r}, backend={self.backend!r}"
        )
