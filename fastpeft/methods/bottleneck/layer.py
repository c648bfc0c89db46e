"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) on an output projection.

``BottleneckLinear`` wraps the linear layer that ends a sub-layer (attention output
``o_proj``, feed-forward output ``down_proj``) and adds, per named adapter::

    h = x W^T + b                                   the sub-layer's output
    u = LN_before(h)          if ln_before else h
    a = s * (f(u Wd^T + bd) Wu^T + bu)              down, non-linearity, up, scaling
    a = LN_after(a)           if ln_after  else a
    y = (h if residual_before_ln else u) + a

With neither layer norm (the default; Houlsby's and Pfeiffer's placements differ only
in *which* sub-layers get an adapter) the whole layer is one call of the fused op
``fastpeft.methods.bottleneck.op.bottleneck_linear``: ``h`` is never written to memory. The
down-projection is moved in front of the GEMM through ``W_eff = Wd W``, which this
module caches per adapter and recomputes only when one of the tensors it is made of
changes (an optimizer step, a ``load_state_dict``). With a layer norm the math needs
the full row of ``h`` first, and the layer runs the base GEMM then the adapter in
PyTorch.

Init near identity: the up-projection (weight and bias) starts at zero, so a new
adapter leaves the layer's output unchanged; the down-projection gets ``nn.Linear``'s
default init and a zero bias.

Parameter names follow AdapterHub's ``Adapter`` module: ``adapters.<name>.adapter_down.0``
(the down Linear; ``.1`` is the non-linearity), ``adapters.<name>.adapter_up``,
``adapters.<name>.adapter_norm_before``, ``adapters.<name>.adapter_norm_after``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.dispatch import autocast_dtype, eager_inference, resolve_backend
from fastpeft.core.linear import AdapterLinear
from fastpeft.methods.bottleneck.config import check_activation
from fastpeft.methods.bottleneck.op import bottleneck_down_eff, bottleneck_linear, bottleneck_linear_unchecked

__all__ = ["BottleneckAdapter", "BottleneckLinear", "bottleneck_size_for"]

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}


def bottleneck_size_for(features: int, bottleneck_size: Optional[int], reduction_factor: Optional[float]) -> int:
    """The bottleneck width D: ``bottleneck_size`` if given, else ``features // reduction_factor``
    (at least 1)."""
    if bottleneck_size is not None:
        if isinstance(bottleneck_size, bool) or not isinstance(bottleneck_size, int) or bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {bottleneck_size!r}")
        return bottleneck_size
    if reduction_factor is None:
        raise ValueError("give bottleneck_size or reduction_factor")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or reduction_factor <= 0:
        raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
    return max(1, int(features // reduction_factor))


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter over ``features`` channels (the module-level math above).

    Its ``forward(h)`` is the unfused PyTorch form (used with layer norms, and as a
    readable statement of the math); :class:`BottleneckLinear` fuses it when it can.
    """

    def __init__(
        self,
        features: int,
        bottleneck_size: int,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        ln_before: bool = False,
        ln_after: bool = False,
        residual_before_ln: bool = True,
        init_weights: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.non_linearity = check_activation(non_linearity)
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")
        bottleneck_size_for(features, bottleneck_size, None)
        self.features = features
        self.bottleneck_size = bottleneck_size
        self.scaling = float(scaling)
        self.residual_before_ln = bool(residual_before_ln)
        factory = {"device": device, "dtype": dtype}
        down = nn.Linear(features, bottleneck_size, **factory)
        # Exact-erf GELU, as the kernel computes it.
        self.adapter_down = nn.Sequential(down, _ACT_MODULES[self.non_linearity]())
        self.adapter_up = nn.Linear(bottleneck_size, features, **factory)
        self.adapter_norm_before = nn.LayerNorm(features, **factory) if ln_before else None
        self.adapter_norm_after = nn.LayerNorm(features, **factory) if ln_after else None
        with torch.no_grad():
            down.bias.zero_()
            if init_weights:
                self.adapter_up.weight.zero_()
                self.adapter_up.bias.zero_()

    @property
    def down(self) -> nn.Linear:
        return self.adapter_down[0]

    @property
    def up(self) -> nn.Linear:
        return self.adapter_up

    @property
    def fusable(self) -> bool:
        """True when the fused kernel computes this adapter (no layer norm)."""
        return self.adapter_norm_before is None and self.adapter_norm_after is None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = h if self.adapter_norm_before is None else self.adapter_norm_before(h)
        a = self.adapter_up(self.adapter_down(u)) * self.scaling
        if self.adapter_norm_after is not None:
            a = self.adapter_norm_after(a)
        return (h if self.residual_before_ln else u) + a

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, bottleneck_size={self.bottleneck_size}, "
            f"non_linearity={self.non_linearity!r}, scaling={self.scaling}, "
            f"residual_before_ln={self.residual_before_ln}"
        )


def _cast(tensors, dtype: torch.dtype) -> tuple:
    """Detached copies of ``tensors`` in ``dtype`` (None stays None)."""
    return tuple(None if t is None else t.detach().to(dtype) for t in tensors)


class BottleneckLinear(AdapterLinear):
    """A linear output projection followed by bottleneck adapters (one active at a time).

    Build with :meth:`from_linear` (or :meth:`from_conv1d` for GPT-2's ``Conv1D``); the
    base weight and bias are shared with the wrapped layer and frozen. Adapter options
    are those of :class:`BottleneckAdapter`; the width is ``bottleneck_size`` or
    ``out_features // reduction_factor``.
    """

    _CACHES = ("_eff_cache", "_cast_cache")

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("build a BottleneckLinear with BottleneckLinear.from_linear(linear, ...)")

    @classmethod
    def _wrap(cls, module: nn.Module, backend: str) -> "BottleneckLinear":
        parts, fan_in_fan_out, base_cls = cls.base_parts(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = 16,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        ln_before: bool = False,
        ln_after: bool = False,
        residual_before_ln: bool = True,
        *,
        adapter_name: str = "default",
        init_weights: bool = True,
        backend: str = "auto",
    ) -> "BottleneckLinear":
        """Wrap ``linear`` (sharing its tensors) and add one adapter named ``adapter_name``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls._wrap(linear, backend)
        layer.add_adapter(adapter_name, bottleneck_size, reduction_factor, non_linearity, scaling,
                          ln_before, ln_after, residual_before_ln, init_weights=init_weights)
        return layer

    @classmethod
    def from_conv1d(cls, conv: nn.Module, *args, adapter_name: str = "default", init_weights: bool = True,
                    backend: str = "auto", **kwargs) -> "BottleneckLinear":
        """Wrap a GPT-2 style ``Conv1D`` (weight ``(in, out)``), read through a transposed view."""
        if isinstance(conv, nn.Linear):
            raise TypeError("from_conv1d expects a transformers Conv1D, got an nn.Linear (use from_linear)")
        layer = cls._wrap(conv, backend)
        layer.add_adapter(adapter_name, *args, init_weights=init_weights, **kwargs)
        return layer

    # ---------------------------------------------------------------- adapters

    def add_adapter(
        self,
        adapter_name: str,
        bottleneck_size: Optional[int] = None,
        reduction_factor: Optional[float] = 16,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        ln_before: bool = False,
        ln_after: bool = False,
        residual_before_ln: bool = True,
        *,
        init_weights: bool = True,
    ) -> None:
        """Add an adapter (active if none is). Validates everything before changing anything."""
        self._check_new_name(adapter_name)
        size = bottleneck_size_for(self.out_features, bottleneck_size, reduction_factor)
        adapter = BottleneckAdapter(
            self.out_features, size, non_linearity, scaling, ln_before, ln_after, residual_before_ln,
            init_weights, device=self.weight.device, dtype=self.weight.dtype,
        )
        self._added(adapter_name, adapter)

    # Bottleneck adapters are non-linear: nothing is ever folded into the base weight, so
    # ``merged_adapters`` stays empty and ``merged`` False.

    def _check_mergeable(self, adapter_name: str) -> None:
        raise ValueError(
            "bottleneck adapters cannot be merged into the base weights (the adapter is non-linear); "
            "keep them unmerged, or unload the model without merging"
        )

    # ---------------------------------------------------------------- forward

    def _down_eff(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], down_w: torch.Tensor,
                  down_b: Optional[torch.Tensor]):
        """``(W_eff, b_eff)`` of an adapter (``weight``: the base as ``(out, in)``),
        recomputed only when a tensor it depends on changed (in-place updates, ``.data``
        swaps, moves: see ``TensorStamp``); under ``torch.compile``, traced from the
        weights on every call (``_kept``)."""
        return self._kept(
            "_eff_cache", name, None, (weight, bias, down_w, down_b),
            lambda: bottleneck_down_eff(weight, bias, down_w, down_b),
        )

    def _adapter_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        adapter: BottleneckAdapter = self.adapters[name]
        weight, bias = self.base_weight(), self.bias
        if not adapter.fusable:
            h = F.linear(x, weight, bias)
            # The adapter runs in its own dtype (fp32 on a half model: autocast_adapter_dtype).
            return adapter(h.to(adapter.down.weight.dtype)).to(h.dtype)
        down, up = adapter.down, adapter.up
        tensors = (down.weight, down.bias, up.weight, up.bias)
        w_eff = b_eff = None
        if resolve_backend(self.backend, x.device, x.dtype) == "triton":
            w_eff, b_eff = self._down_eff(name, weight, bias, tensors[0], tensors[1])
        if autocast_dtype(x.device) is None and eager_inference(x, weight, bias, *tensors):
            # Decode: no checks beyond the layer's own, the adapter in x's dtype kept
            # (not cast per call), the kernel launched without the custom op.
            dw, db, uw, ub = tensors
            if dw.dtype != x.dtype or uw.dtype != x.dtype or (db is not None and db.dtype != x.dtype) or (
                ub is not None and ub.dtype != x.dtype
            ):
                tensors = self._kept("_cast_cache", name, x.dtype, tensors, lambda: _cast(tensors, x.dtype))
            return bottleneck_linear_unchecked(
                x, weight, bias, *tensors, adapter.scaling, adapter.non_linearity, w_eff, b_eff, self.backend
            )
        return bottleneck_linear(
            x, weight, bias, down.weight, down.bias, up.weight, up.bias, adapter.scaling,
            adapter.non_linearity, w_eff=w_eff, b_eff=b_eff, backend=self.backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.__dict__.get("_row_plan") is not None:
            return self._forward_by_row_groups(x, self._adapter_forward)
        if self.active_adapter is None:
            return F.linear(x, self.base_weight(), self.bias)
        return self._adapter_forward(x, self.active_adapter)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"active={self.active_adapter!r}, backend={self.backend!r}"
        )
