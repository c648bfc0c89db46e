"""``IA3Linear``: a drop-in ``nn.Linear`` with one or more (IA)^3 adapters.

(IA)^3 (Liu et al., 2022) learns one vector ``l`` per adapted layer, as PEFT defines it:

* ordinary targets (attention k/v): the output is scaled, ``y = (x W^T + b) * l``,
  ``l`` of shape ``(out_features, 1)``;
* feed-forward targets (``is_feedforward``): the input is scaled,
  ``y = (x * l) W^T + b``, ``l`` of shape ``(1, in_features)``.

``l`` is kept in PEFT's checkpoint shape, so ``ia3_l`` tensors load and save unchanged.
The forward of the active adapter is one call of the fused op
(``fastpeft.ops_adapters.ia3_linear``): the scale is applied in the GEMM's prologue or
epilogue, with no extra pass over ``x`` or ``y``. ``merge`` folds ``l`` into the base
weight (and, for output scaling, the bias) exactly as PEFT does.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.layers import AdapterLinear
from fastpeft.ops_adapters import ia3_linear

__all__ = ["IA3Linear"]


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
        self.ia3_l = nn.ParameterDict()

    def _adapter_store(self) -> nn.ParameterDict:
        return self.ia3_l

    def adapter_parameters(self, adapter_name: str) -> List[torch.Tensor]:
        self._require(adapter_name)
        return [self.ia3_l[adapter_name]]

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        is_feedforward: bool = False,
        *,
        adapter_name: str = "default",
        init_ia3_weights: bool = True,
        backend: str = "auto",
    ) -> "IA3Linear":
        """Wrap ``linear``: the new layer shares its weight and bias tensors (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(cls._linear_parts(linear), is_feedforward, backend, fan_in_fan_out=False, base_cls=nn.Linear)
        layer.add_adapter(adapter_name, init_ia3_weights)
        return layer

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        is_feedforward: bool = False,
        *,
        adapter_name: str = "default",
        init_ia3_weights: bool = True,
        backend: str = "auto",
    ) -> "IA3Linear":
        """Wrap a GPT-2 style ``Conv1D`` (weight ``(in, out)``; PEFT's ``fan_in_fan_out``).
        The kernel reads the transposed view through strides: no copy of the weight."""
        parts = cls._conv1d_parts(conv)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(parts, is_feedforward, backend, fan_in_fan_out=True, base_cls=type(conv))
        layer.add_adapter(adapter_name, init_ia3_weights)
        return layer

    @property
    def l_shape(self) -> tuple:
        """PEFT's shape of ``ia3_l`` for this layer: ``(1, in)`` or ``(out, 1)``."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    # ---------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add an adapter (active if none is): ``l = 1``, or ``N(0, 1)`` with
        ``init_ia3_weights=False``, as PEFT initialises it."""
        self._check_new_name(adapter_name)
        if not isinstance(init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {init_ia3_weights!r}")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        if init_ia3_weights:
            l = torch.ones(self.l_shape, **factory)
        else:
            l = torch.randn(self.l_shape, device=self.weight.device).to(self.weight.dtype)
        self.ia3_l[adapter_name] = nn.Parameter(l)
        self._after_add(adapter_name)

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
            self.ia3_l[adapter_name].copy_(value.reshape(want))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; unmerges first if it is merged."""
        self._require(adapter_name)
        if adapter_name in self.merged_adapters:
            self._undo_merge(adapter_name)
            self.merged_adapters.remove(adapter_name)
        del self.ia3_l[adapter_name]
        self._after_delete(adapter_name)

    @property
    def ia3_vector(self) -> nn.Parameter:
        """``l`` of the active adapter, in PEFT's shape."""
        if self.active_adapter is None:
            raise AttributeError("this layer has no active adapter (set_adapter(None) was called)")
        return self.ia3_l[self.active_adapter]

    # ---------------------------------------------------------------- merge

    def _check_mergeable(self, adapter_name: str) -> None:
        if not bool(torch.isfinite(self.ia3_l[adapter_name].detach()).all()):
            raise ValueError(f"cannot merge adapter {adapter_name!r}: ia3_l holds NaN or inf")

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], inverse: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W * l`` (rows for output scaling, columns for input scaling) and, for output
        scaling, ``b * l``; ``inverse`` divides. fp32 math, stored in the base dtypes, as
        new tensors."""
        l = self.ia3_l[adapter_name].detach().float().reshape(-1)
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
        weight = self.base_weight()
        if self.row_adapters is not None:
            if self.merged:
                raise RuntimeError(
                    "mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first"
                )
            return self._mixed_forward(x)
        name = self.active_adapter
        if name is None or self.merged:
            # Base only, or an adapter already folded into the weights: cuBLAS.
            return F.linear(x, weight, self.bias)
        return ia3_linear(x, weight, self.bias, self.ia3_l[name], self.is_feedforward, backend=self.backend)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each batch row (``x``'s dim 0) through its own adapter (``row_adapters``);
        ``None`` or a name this layer does not hold: the base only. One sub-batch per adapter."""
        weight = self.base_weight()

        def run(rows: torch.Tensor, name: str) -> torch.Tensor:
            return ia3_linear(rows, weight, self.bias, self.ia3_l[name], self.is_feedforward, backend=self.backend)

        return self._forward_by_row_groups(x, run)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, is_feedforward={self.is_feedforward}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, adapters={list(self.ia3_l)}, "
            f"active={self.active_adapter!r}, backend={self.backend!r}"
        )
