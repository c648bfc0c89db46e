"""``FastLoRALinear``: a drop-in ``nn.Linear`` with one or more LoRA adapters.

The frozen base lives in ``weight``/``bias``; each named adapter holds ``A (r, in)`` and
``B (out, r)`` in PEFT's layout. The forward of the active adapter is one call of the
fused op (``fastpeft.ops.lora_linear``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.ops import BACKENDS, check_linear_input, lora_linear

__all__ = ["FastLoRALinear"]

InitSpec = Union[bool, str]


def _check_rank(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return r


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class FastLoRALinear(nn.Module):
    """Linear layer ``y = x W^T + b + s * (dropout(x) A^T) B^T`` with fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r, lora_alpha, lora_dropout, use_rslora: the first adapter (named
            ``adapter_name``), as PEFT's ``LoraConfig`` defines them.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            PyTorch reference), ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
        *,
        adapter_name: str = "default",
        init_lora_weights: InitSpec = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_rank(r)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        # Base init as nn.Linear does, so a freshly built layer is a usable Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._init_adapter_state()
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def _init_adapter_state(self) -> None:
        self.lora_A_weights = nn.ParameterDict()
        self.lora_B_weights = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scalings: Dict[str, float] = {}
        self.active_adapter: Optional[str] = None
        self.merged_adapters: List[str] = []

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_name: str = "default",
        init_lora_weights: InitSpec = True,
        backend: str = "auto",
    ) -> "FastLoRALinear":
        """Wrap ``linear``: the new layer shares its weight and bias tensors (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_rank(r)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.backend = backend
        layer.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        layer.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        layer._init_adapter_state()
        layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        return layer

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitSpec = True,
    ) -> None:
        """Add an adapter (and make it active if none is). Initialised as PEFT does.

        ``init_lora_weights``: True (A kaiming-uniform a=sqrt(5), B zeros: the layer
        equals its base), ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or False (A and B both
        kaiming-uniform, a non-trivial adapter: for tests).
        """
        _check_rank(r)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        if adapter_name in self.r:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        A = torch.empty(r, self.in_features, **factory)
        B = torch.empty(self.out_features, r, **factory)
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)
        self.lora_A_weights[adapter_name] = nn.Parameter(A)
        self.lora_B_weights[adapter_name] = nn.Parameter(B)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scalings[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; unmerges first if it is merged."""
        self._require(adapter_name)
        if adapter_name in self.merged_adapters:
            self._apply_delta(adapter_name, -1.0)
            self.merged_adapters.remove(adapter_name)
        for store in (self.lora_A_weights, self.lora_B_weights, self.lora_dropout):
            del store[adapter_name]
        for meta in (self.r, self.lora_alpha, self.scalings):
            del meta[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.r), None)

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Make ``adapter_name`` the active adapter; ``None`` runs the base layer only."""
        if adapter_name is not None:
            self._require(adapter_name)
        self.active_adapter = adapter_name

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.r:
            raise KeyError(f"no adapter named {adapter_name!r} in this layer; it has {sorted(self.r)}")

    # ---------------------------------------------------------------- active adapter

    def _active(self) -> str:
        if self.active_adapter is None:
            raise AttributeError("this layer has no active adapter (set_adapter(None) was called)")
        return self.active_adapter

    @property
    def lora_A(self) -> nn.Parameter:
        """Down-projection of the active adapter, shape ``(r, in_features)``."""
        return self.lora_A_weights[self._active()]

    @property
    def lora_B(self) -> nn.Parameter:
        """Up-projection of the active adapter, shape ``(out_features, r)``."""
        return self.lora_B_weights[self._active()]

    @property
    def scaling(self) -> float:
        """Scaling of the active adapter: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self.scalings[self._active()]

    # ---------------------------------------------------------------- merge

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B A`` of one adapter, computed in fp32, shape ``(out, in)``."""
        A = self.lora_A_weights[adapter_name].detach().float()
        B = self.lora_B_weights[adapter_name].detach().float()
        return (B @ A) * self.scalings[adapter_name]

    def _apply_delta(self, adapter_name: str, sign: float) -> None:
        with torch.no_grad():
            w = self.weight.data.float() + sign * self.delta_weight(adapter_name)
            self.weight.data.copy_(w.to(self.weight.dtype))

    def merge(self, adapter_name: Optional[str] = None) -> None:
        """Fold ``s * B A`` of the active (or named) adapter into ``weight``."""
        name = adapter_name if adapter_name is not None else self._active()
        self._require(name)
        if name in self.merged_adapters:
            return
        self._apply_delta(name, +1.0)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, newest first (exact up to the weight dtype's rounding)."""
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(x, self.weight, type(self).__name__)
        name = self.active_adapter
        if name is None or name in self.merged_adapters or self.merged:
            # The base (with any merged adapters folded in) is a plain linear: cuBLAS.
            return F.linear(x, self.weight, self.bias)
        dropout = self.lora_dropout[name]
        x_lora = dropout(x) if (self.training and isinstance(dropout, nn.Dropout)) else None
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A_weights[name],
            self.lora_B_weights[name],
            self.scalings[name],
            x_lora=x_lora,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={r})" for n, r in self.r.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, adapters=[{adapters}], active={self.active_adapter!r}, "
            f"backend={self.backend!r}"
        )
