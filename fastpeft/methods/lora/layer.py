"""``FastLoRALinear``: a drop-in ``nn.Linear`` with one or more LoRA adapters.

The frozen base lives in ``weight``/``bias``; each named adapter is one
:class:`LoraAdapter` module in ``adapters`` holding ``lora_A (r, in)`` and ``lora_B (out,
r)`` in PEFT's layout (and, with ``lora_bias``, PEFT's ``lora_B.bias``). ``layer.lora_A``,
``layer.lora_B`` and ``layer.scaling`` are the active adapter's. The forward of the active
adapter is one call of the fused op (``fastpeft.methods.lora.op``); a mixed batch is one
call of the mixed-adapter op over slot stacks (``fastpeft.methods.lora.stacks``).

A layer made from a GPT-2 style ``Conv1D`` (``fan_in_fan_out``) keeps the Conv1D's
``(in, out)`` weight tensor as is and hands the op a transposed *view* of it: the kernel
reads through strides, so no copy of the base weight is ever made.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.batch import BatchPlan
from fastpeft.core.dispatch import autocast_cast, autocast_dtype, check_linear_input
from fastpeft.core.layer import AdapterLinear, TensorStamp
from fastpeft.methods.lora.config import lora_scaling
from fastpeft.methods.lora.multi_op import multi_lora_linear
from fastpeft.methods.lora.op import lora_linear_unchecked
from fastpeft.methods.lora.stacks import SlotStacks, batch_meta, stack_adapters

__all__ = ["FastLoRALinear", "LoraAdapter"]

InitSpec = Union[bool, str]


def _check_rank(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return r


class LoraAdapter(nn.Module):
    """One LoRA adapter: ``s * (dropout(x) A^T) B^T (+ s * lora_bias)``, PEFT's layout.

    ``init_lora_weights``: True (A kaiming-uniform a=sqrt(5), B zeros: the layer equals
    its base), ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or False (A and B both
    kaiming-uniform, a non-trivial adapter: for tests). ``lora_bias`` adds PEFT's
    ``lora_B.bias`` (zeros unless ``init_lora_weights`` is False), scaled like ``B``.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: InitSpec = True, lora_bias: bool = False,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        _check_rank(r)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)  # checks lora_alpha first
        self.r, self.lora_alpha = r, lora_alpha
        factory = {"device": device, "dtype": dtype}
        A = torch.empty(r, in_features, **factory)
        B = torch.empty(out_features, r, **factory)
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(B)
        self.lora_bias: Optional[nn.Parameter] = None
        if lora_bias:
            lb = torch.zeros(out_features, **factory)
            if init_lora_weights is False:
                # nn.Linear(r, out)'s own bias init, as PEFT's lora_B is an nn.Linear.
                nn.init.uniform_(lb, -1 / math.sqrt(r), 1 / math.sqrt(r))
            self.lora_bias = nn.Parameter(lb)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``, computed in fp32, shape ``(out, in)``."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling}, lora_bias={self.lora_bias is not None}"


class FastLoRALinear(AdapterLinear):
    """Linear layer ``y = x W^T + b + s * (dropout(x) A^T) B^T`` with fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r, lora_alpha, lora_dropout, use_rslora: the first adapter (named
            ``adapter_name``), as PEFT's ``LoraConfig`` defines them.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            PyTorch reference), ``"triton"`` or ``"torch"``.
    """

    _CACHES = ("_stack_cache",)

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
        weight, b = self._new_linear_tensors(in_features, out_features, bias, device, dtype)
        self._init_base(weight, b, backend=backend)
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    @classmethod
    def wrap(
        cls, module: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, *, adapter_name: str = "default", init_lora_weights: InitSpec = True,
        lora_bias: bool = False, backend: str = "auto",
    ) -> "FastLoRALinear":
        """Wrap an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (``y = x W + b``, ``W: (in,
        out)``: PEFT's ``fan_in_fan_out``, kept in its layout): the new layer shares the
        module's weight and bias tensors (no copy)."""
        _check_rank(r)
        parts, fan_in_fan_out, base_cls = cls.base_parts(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        layer.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias=lora_bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args, **kwargs) -> "FastLoRALinear":
        """Wrap ``linear`` (arguments as :meth:`wrap`): shares its weight and bias (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.wrap(linear, *args, **kwargs)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, *args, **kwargs) -> "FastLoRALinear":
        """Wrap a transformers ``Conv1D`` (arguments as :meth:`wrap`)."""
        if isinstance(conv, nn.Linear):
            raise TypeError("from_conv1d expects a transformers Conv1D, got an nn.Linear (use from_linear)")
        return cls.wrap(conv, *args, **kwargs)

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: InitSpec = True,
        *,
        lora_bias: bool = False,
    ) -> None:
        """Add an adapter (and make it active if none is); see :class:`LoraAdapter`."""
        self._check_new_name(adapter_name)
        adapter = LoraAdapter(
            self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
            lora_bias, device=self.weight.device, dtype=self.weight.dtype,
        )
        self._added(adapter_name, adapter)

    # ---------------------------------------------------------------- active adapter

    @property
    def lora_A(self) -> nn.Parameter:
        """Down-projection of the active adapter, shape ``(r, in_features)``."""
        return self.adapters[self._active()].lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        """Up-projection of the active adapter, shape ``(out_features, r)``."""
        return self.adapters[self._active()].lora_B

    @property
    def scaling(self) -> float:
        """Scaling of the active adapter: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        return self.adapters[self._active()].scaling

    # ---------------------------------------------------------------- merge

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B A`` of one adapter, computed in fp32, shape ``(out, in)``."""
        return self.adapters[adapter_name].delta_weight()

    def _apply_delta(self, adapter_name: str, sign: float) -> None:
        adapter = self.adapters[adapter_name]
        with torch.no_grad():
            delta = adapter.delta_weight()
            if self.fan_in_fan_out:
                delta = delta.t()
            w = self.weight.data.float() + sign * delta
            self.weight.data.copy_(w.to(self.weight.dtype))
            if adapter.lora_bias is not None:
                b = self.bias.data.float() + sign * adapter.lora_bias.detach().float() * adapter.scaling
                self.bias.data.copy_(b.to(self.bias.dtype))

    def merge(self, adapter_name: Optional[str] = None) -> None:
        """Fold ``s * B A`` (and ``s * lora_bias``) of the active (or named) adapter into
        ``weight`` (and ``bias``)."""
        name = adapter_name if adapter_name is not None else self._active()
        self._require(name)
        if name in self.merged_adapters:
            return
        if self.adapters[name].lora_bias is not None and self.bias is None:
            # As PEFT: there is no base bias to fold lora_B.bias into.
            raise ValueError(
                f"cannot merge adapter {name!r}: it has lora_bias=True but the base layer has no bias"
            )
        self._apply_delta(name, +1.0)
        self.merged_adapters.append(name)

    def _undo_merge(self, adapter_name: str) -> None:
        self._apply_delta(adapter_name, -1.0)

    # ---------------------------------------------------------------- forward

    def _effective_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Base bias plus ``s * lora_bias`` (PEFT scales ``lora_B``'s output, bias included).

        A tiny torch op outside the kernel, so autograd reaches ``lora_bias`` through the
        op's bias gradient.
        """
        adapter = self.adapters[adapter_name]
        if adapter.lora_bias is None:
            return self.bias
        # An fp32 lora_bias on a half model (autocast_adapter_dtype) joins in the base's dtype.
        scaled = (adapter.lora_bias * adapter.scaling).to(self.weight.dtype)
        return scaled if self.bias is None else self.bias + scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_weight(), self.bias
        amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        if amp is not None:  # torch.autocast: run in its dtype, as nn.Linear does
            x, weight, bias = autocast_cast(amp, x, weight, bias)
        check_linear_input(x, weight, type(self).__name__)
        if self.batch_plan is not None:
            return self._mixed_forward(x, self.batch_plan, weight, bias)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            # The base (with any merged adapters folded in) is a plain linear: cuBLAS.
            return F.linear(x, weight, bias)
        adapter = self.adapters[name]
        x_lora = None
        if self.training and isinstance(adapter.dropout, nn.Dropout):
            x_lora = adapter.dropout(x)
        lora_A, lora_B = adapter.lora_A, adapter.lora_B
        eff_bias = bias if adapter.lora_bias is None else self._effective_bias(name)
        if amp is not None:
            eff_bias, lora_A, lora_B = autocast_cast(amp, eff_bias, lora_A, lora_B)
        # x is checked above and the adapter's shapes are the layer's own (add_adapter and
        # checkpoint loading check them): skip the op's second round of checks.
        return lora_linear_unchecked(x, weight, eff_bias, lora_A, lora_B, adapter.scaling, x_lora, self.backend)

    def _mixed_forward(
        self, x: torch.Tensor, plan: BatchPlan, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Each batch row (``x``'s dim 0) through its own adapter (``plan.rows``); None:
        base only. ``weight``/``bias``: the base as ``forward`` casts it (autocast).

        One fused mixed-adapter kernel call over slot stacks: those a provider (the
        serving pool) put in the plan for this layer, else this layer's own adapters that
        the batch names (a name this layer does not hold runs the base, as in PEFT: the
        adapter did not target this layer). A ``lora_bias`` adds ``s * lora_bias`` to its
        rows afterwards.
        """
        if self.training:
            raise RuntimeError(
                "mixed-adapter batches (fastpeft.batch_adapters) run in eval mode only, as PEFT's "
                "adapter_names=: call model.eval() first"
            )
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first")
        plan.check_batch(x)
        stacks = plan.provided.get(self)
        if stacks is None:
            stacks = self._own_stacks(plan, x.device)
            if stacks is None:
                return F.linear(x, weight, bias)
        out = multi_lora_linear(
            x, weight, bias, stacks.lora_A, stacks.lora_B, stacks.ranks, stacks.scalings,
            batch_meta(plan, stacks, x), backend=self.backend, check=False,
        )
        if stacks.bias_table is not None:
            # PEFT scales lora_B's output, bias included: add s_i * lora_bias_i to row i.
            table = stacks.bias_table
            per_row = table[torch.where(stacks.batch_slot < 0, table.shape[0] - 1, stacks.batch_slot).long()]
            out = out + per_row.to(out.dtype).reshape(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        return out

    def _own_stacks(self, plan: BatchPlan, device: torch.device) -> Optional[SlotStacks]:
        """Slot stacks of this layer's adapters that the plan names (None: none of them).

        Kept for the next forward of the same plan while the adapters' tensors are
        unchanged (``TensorStamp``: in-place updates, ``.data`` swaps), so decoding step
        after step stacks and uploads once per batch, not once per step and layer.
        """
        names = [n for n in dict.fromkeys(plan.rows) if n is not None and n in self.adapters]
        if not names:
            return None
        adapters = [self.adapters[n] for n in names]
        tensors = [t for a in adapters for t in (a.lora_A, a.lora_B, a.lora_bias) if t is not None]
        check = (plan, device, tuple(a.scaling for a in adapters))
        hit = self._stack_cache.get("batch")
        if hit is not None and hit[0] == check and hit[1].matches(tensors):
            return hit[2]
        stacks = stack_adapters(adapters, names, plan.rows, device, self.weight.dtype)
        if not (stacks.lora_A.requires_grad or stacks.lora_B.requires_grad):  # never keep a graph alive
            self._stack_cache["batch"] = (check, TensorStamp(tensors), stacks)
        return stacks

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={a.r})" for n, a in self.adapters.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"adapters=[{adapters}], active={self.active_adapter!r}, "
            f"backend={self.backend!r}"
        )
