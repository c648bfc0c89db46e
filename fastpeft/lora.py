"""``FastLoRALinear``: a drop-in ``nn.Linear`` with one or more LoRA adapters.

The frozen base lives in ``weight``/``bias``; each named adapter holds ``A (r, in)`` and
``B (out, r)`` in PEFT's layout (and, with ``lora_bias``, a bias of ``B``). The forward
of the active adapter is one call of the fused op (``fastpeft.ops.lora_linear``).

A layer made from a GPT-2 style ``Conv1D`` (``fan_in_fan_out``) keeps the Conv1D's
``(in, out)`` weight tensor as is and hands the op a transposed *view* of it: the kernel
reads through strides, so no copy of the base weight is ever made.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.layers import AdapterLinear
from fastpeft.ops import autocast_cast, autocast_dtype, check_linear_input, lora_linear_unchecked

__all__ = ["FastLoRALinear", "POOL_ATTR"]

# Attribute an ``AdapterPool`` (fastpeft.serving) sets on each layer it serves: the
# layer's view of the pool's fixed slots, read by ``_mixed_forward``.
POOL_ATTR = "_fastpeft_pool_slots"

InitSpec = Union[bool, str]


@dataclass(frozen=True)
class _LoraRowPlan:
    """A mixed batch's rows for one LoRA layer (``FastLoRALinear._make_row_plan``).

    ``slots``: the pool attached when the plan was made (None: none); ``from_pool``:
    the rows use that pool's slots; ``row_slot``: ``(B,)`` int32 slot of each batch row
    (-1: base only), None when the layer has no adapter to run; ``used``: some row has
    an adapter here (eager runs a batch with none as a plain linear; a compiled graph
    runs the mixed op for every batch, so that which rows use this layer stays data);
    ``error``: why the batch cannot run (raised by the forward), else None.
    """

    slots: Any
    from_pool: bool
    row_slot: Optional[torch.Tensor]
    used: bool
    error: Optional[str]


def _check_rank(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return r


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (rsLoRA)."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class FastLoRALinear(AdapterLinear):
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
        weight, b = self._new_linear_tensors(in_features, out_features, bias, device, dtype)
        self._init_base(weight, b, backend=backend)
        self._init_adapter_state()
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    def _init_adapter_state(self) -> None:
        self.lora_A_weights = nn.ParameterDict()
        self.lora_B_weights = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        # PEFT's ``lora_B.bias`` (``lora_bias=True``), only for the adapters that have one.
        self.lora_B_biases = nn.ParameterDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scalings: Dict[str, float] = {}

    def _adapter_store(self) -> Dict[str, int]:
        return self.r

    def adapter_parameters(self, adapter_name: str) -> List[torch.Tensor]:
        self._require(adapter_name)
        own = [self.lora_A_weights[adapter_name], self.lora_B_weights[adapter_name]]
        return own + ([self.lora_B_biases[adapter_name]] if adapter_name in self.lora_B_biases else [])

    # ---------------------------------------------------------------- construction

    @classmethod
    def _wrap(
        cls,
        parts: Tuple[torch.Tensor, Optional[torch.Tensor]],
        fan_in_fan_out: bool,
        base_cls: type,
        backend: str,
        adapter_name: str,
        adapter_args: tuple,
        init_lora_weights: InitSpec,
        lora_bias: bool,
    ) -> "FastLoRALinear":
        _check_rank(adapter_args[0])
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        layer._init_adapter_state()
        layer.add_adapter(adapter_name, *adapter_args, init_lora_weights, lora_bias=lora_bias)
        return layer

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
        lora_bias: bool = False,
        backend: str = "auto",
    ) -> "FastLoRALinear":
        """Wrap ``linear``: the new layer shares its weight and bias tensors (no copy)."""
        return cls._wrap(
            cls._linear_parts(linear), False, nn.Linear, backend, adapter_name,
            (r, lora_alpha, lora_dropout, use_rslora), init_lora_weights, lora_bias,
        )

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_name: str = "default",
        init_lora_weights: InitSpec = True,
        lora_bias: bool = False,
        backend: str = "auto",
    ) -> "FastLoRALinear":
        """Wrap a GPT-2 style ``Conv1D`` (``y = x W + b`` with ``W: (in, out)``): PEFT's
        ``fan_in_fan_out=True``. The layer shares the Conv1D's tensors and keeps its layout.
        """
        return cls._wrap(
            cls._conv1d_parts(conv), True, type(conv), backend, adapter_name,
            (r, lora_alpha, lora_dropout, use_rslora), init_lora_weights, lora_bias,
        )

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
        """Add an adapter (and make it active if none is). Initialised as PEFT does.

        ``init_lora_weights``: True (A kaiming-uniform a=sqrt(5), B zeros: the layer
        equals its base), ``"gaussian"`` (A ~ N(0, 1/r), B zeros) or False (A and B both
        kaiming-uniform, a non-trivial adapter: for tests). ``lora_bias`` adds PEFT's
        ``lora_B.bias`` (zeros unless ``init_lora_weights`` is False), scaled like ``B``.
        """
        _check_rank(r)
        self._check_new_name(adapter_name)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        scaling = lora_scaling(r, lora_alpha, use_rslora)  # checks lora_alpha before anything is added
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
        if lora_bias:
            lb = torch.zeros(self.out_features, **factory)
            if init_lora_weights is False:
                # nn.Linear(r, out)'s own bias init, as PEFT's lora_B is an nn.Linear.
                nn.init.uniform_(lb, -1 / math.sqrt(r), 1 / math.sqrt(r))
            self.lora_B_biases[adapter_name] = nn.Parameter(lb)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scalings[adapter_name] = scaling
        self._after_add(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; unmerges first if it is merged."""
        self._require(adapter_name)
        if adapter_name in self.merged_adapters:
            self._apply_delta(adapter_name, -1.0)
            self.merged_adapters.remove(adapter_name)
        for store in (self.lora_A_weights, self.lora_B_weights, self.lora_dropout):
            del store[adapter_name]
        if adapter_name in self.lora_B_biases:
            del self.lora_B_biases[adapter_name]
        for meta in (self.r, self.lora_alpha, self.scalings):
            del meta[adapter_name]
        self._after_delete(adapter_name)

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

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B A`` of one adapter, computed in fp32, shape ``(out, in)``."""
        A = self.lora_A_weights[adapter_name].detach().float()
        B = self.lora_B_weights[adapter_name].detach().float()
        return (B @ A) * self.scalings[adapter_name]

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], sign: float = 1.0
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W + sign * s B A`` (and ``b + sign * s lora_bias``): fp32 math, stored in
        the base dtypes, as new tensors."""
        delta = self.delta_weight(adapter_name)
        if self.fan_in_fan_out:
            delta = delta.t()
        weight = (weight.float() + sign * delta).to(weight.dtype)
        if adapter_name in self.lora_B_biases:
            lb = self.lora_B_biases[adapter_name].detach().float() * self.scalings[adapter_name]
            bias = (bias.float() + sign * lb).to(bias.dtype)
        return weight, bias

    def _apply_delta(self, adapter_name: str, sign: float) -> None:
        with torch.no_grad():
            self._write_base(*self._fold(adapter_name, self.weight.detach(), self.bias, sign))

    def _check_mergeable(self, adapter_name: str) -> None:
        if adapter_name in self.lora_B_biases and self.bias is None:
            # As PEFT: there is no base bias to fold lora_B.bias into.
            raise ValueError(
                f"cannot merge adapter {adapter_name!r}: it has lora_bias=True but the base layer has no bias"
            )

    def _undo_merge(self, adapter_name: str) -> None:
        self._apply_delta(adapter_name, -1.0)

    # ---------------------------------------------------------------- forward

    def _effective_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Base bias plus ``s * lora_bias`` (PEFT scales ``lora_B``'s output, bias included).

        A tiny torch op outside the kernel, so autograd reaches ``lora_bias`` through the
        op's bias gradient.
        """
        lb = self.lora_B_biases[adapter_name] if adapter_name in self.lora_B_biases else None
        if lb is None:
            return self.bias
        # An fp32 lora_bias on a half model (autocast_adapter_dtype) joins in the base's dtype.
        scaled = (lb * self.scalings[adapter_name]).to(self.weight.dtype)
        return scaled if self.bias is None else self.bias + scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_weight(), self.bias
        amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        if amp is not None:  # torch.autocast: run in its dtype, as nn.Linear does
            x, weight, bias = autocast_cast(amp, x, weight, bias)
        check_linear_input(x, weight, type(self).__name__)
        if self.row_adapters is not None:
            if self.training:
                raise RuntimeError(
                    "mixed-adapter batches (fastpeft.batch_adapters) run in eval mode only, as PEFT's "
                    "adapter_names=: call model.eval() first"
                )
            if self.merged:
                raise RuntimeError(
                    "mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first"
                )
            return self._mixed_forward(x, weight, bias)
        name = self.active_adapter
        if name is None or name in self.merged_adapters or self.merged:
            # The base (with any merged adapters folded in) is a plain linear: cuBLAS.
            return F.linear(x, weight, bias)
        x_lora = None
        if self.training:
            dropout = self.lora_dropout[name]
            x_lora = dropout(x) if isinstance(dropout, nn.Dropout) else None
        lora_A, lora_B = self.lora_A_weights[name], self.lora_B_weights[name]
        eff_bias = self._effective_bias(name)
        if amp is not None:
            eff_bias, lora_A, lora_B = autocast_cast(amp, eff_bias, lora_A, lora_B)
        # x is checked above and the adapter's shapes are the layer's own (add_adapter and
        # checkpoint loading check them): skip the op's second round of checks.
        return lora_linear_unchecked(x, weight, eff_bias, lora_A, lora_B, self.scalings[name], x_lora, self.backend)

    def _make_row_plan(self, names: Sequence[Optional[str]]) -> "_LoraRowPlan":
        """Where the rows of a mixed batch take their adapters from, as tensors (made once
        per batch; see ``AdapterLinear._plan_rows``).

        * With an ``AdapterPool`` attached and every name in it: the pool's slot of each
          row (one tensor per batch, shared by the layers of that pool).
        * Otherwise this layer's own adapters: the position of each row's adapter among
          this layer's adapters (the order of ``self.r``, the order they are stacked in);
          ``None`` or a name the layer does not hold: -1, the base only, as in PEFT (the
          adapter did not target this layer).
        """
        slots = getattr(self, POOL_ATTR, None)
        device = self.weight.device
        wanted = {n for n in names if n is not None}
        if slots is not None:
            in_pool = {n for n in wanted if n in slots.pool}
            if in_pool and in_pool != wanted:
                return _LoraRowPlan(slots, False, None, False, (
                    f"a mixed batch takes its adapters from the pool or from the layers, not both: "
                    f"{sorted(wanted - in_pool)} are not loaded in the pool ({slots.pool.adapters})"
                ))
            if in_pool:
                return _LoraRowPlan(slots, True, slots.pool.batch_slots(names).to(device), True, None)
        if not self.r:
            return _LoraRowPlan(slots, False, None, False, None)
        index = {n: i for i, n in enumerate(self.r)}
        row_slot = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int32, device=device)
        return _LoraRowPlan(slots, False, row_slot, any(n in index for n in wanted), None)

    def _mixed_forward(
        self,
        x: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Each batch row (``x``'s dim 0) through its own adapter (``row_adapters``);
        ``None``: base only. ``weight``/``bias``: the base as ``forward`` casts it
        (autocast); default the layer's.

        One fused mixed-adapter kernel call (``fastpeft.ops_multi.multi_lora_linear``),
        rows as the batch's row plan (:meth:`_make_row_plan`) says:

        * from an attached ``AdapterPool``: the pool's fixed slot stacks, and its batch
          metadata (eager: built once per batch and shared by every layer; compiled:
          built in the graph from the plan's slots, so no names are baked into it);
        * from this layer's own adapters: all of them stacked (padded to the largest
          rank; the kernels never read the padding), each row indexing its own. A
          ``lora_bias`` adds ``s * lora_bias`` to its rows afterwards.
        """
        from fastpeft.ops_multi import multi_lora_linear, row_slots_for_tokens

        row_adapters = self.row_adapters
        self._check_rows(x, row_adapters)
        if weight is None:
            weight, bias = self.base_weight(), self.bias
        plan: Optional[_LoraRowPlan] = self.__dict__.get("_row_plan")
        if plan is None or plan.slots is not getattr(self, POOL_ATTR, None):
            plan = self._plan_rows()  # a pool was attached or detached during the batch
        if plan.error is not None:
            raise KeyError(plan.error)
        # (is_compiling first: a compiled graph never reads, nor guards on, ``used``)
        if plan.row_slot is None or not (torch.compiler.is_compiling() or plan.used):
            return F.linear(x, weight, bias)
        if plan.from_pool:
            slots = plan.slots
            if torch.compiler.is_compiling():
                rows = row_slots_for_tokens(plan.row_slot, x)
            else:
                rows = slots.pool.meta_for(row_adapters, x)
            return multi_lora_linear(
                x, weight, bias, slots.lora_A, slots.lora_B, slots.ranks, slots.scalings, rows,
                backend=self.backend, check=False,
            )
        lora_A, lora_B, ranks, scalings, bias_table = self._batch_stacks(x.device)
        out = multi_lora_linear(
            x, weight, bias, lora_A, lora_B, ranks, scalings, row_slots_for_tokens(plan.row_slot, x),
            backend=self.backend, check=False,
        )
        if bias_table is not None:
            # PEFT scales lora_B's output, bias included: add s_i * lora_bias_i to row i
            # (the table's last row is zeros, for the rows with no adapter here).
            slot = plan.row_slot.long()
            per_row = bias_table[torch.where(slot < 0, bias_table.shape[0] - 1, slot)]
            out = out + per_row.to(out.dtype).reshape(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        return out

    def _batch_stacks(self, device: torch.device):
        """``(lora_A, lora_B, ranks, scalings, bias_table)``: this layer's adapters stacked
        in slots (in the order of ``self.r``, padded to the largest rank; the kernels never
        read the padding), and the per-slot ``s * lora_bias`` table with a last row of
        zeros (None without lora_bias).

        Kept for the next forward while the adapters' tensors and scalings are unchanged
        (``AdapterLinear._kept``: in-place updates, ``.data`` swaps), so decoding step after
        step with one batch stacks and uploads once, not once per step and layer; under
        ``torch.compile`` the stacking is part of the graph.
        """
        names = list(self.r)
        tensors = [self.lora_A_weights[n] for n in names] + [self.lora_B_weights[n] for n in names]
        tensors += [self.lora_B_biases[n] for n in names if n in self.lora_B_biases]
        key = (tuple(id(t) for t in tensors), tuple(self.scalings[n] for n in names))
        return self._kept("_stack_cache", device, key, tensors, lambda: self._stack(names, device))

    def _stack(self, names: List[str], device: torch.device):
        """The stacks of :meth:`_batch_stacks`, built."""
        R = max(self.r[n] for n in names)
        # Built with autograd on when it is on, so that a backward through a mixed batch
        # reaches each adapter's own tensors through the stacks; with autocast off, since
        # stacking copies tensors in their own dtypes (CPU autocast refuses fp16 there).
        with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
            lora_A = torch.stack([F.pad(self.lora_A_weights[n], (0, 0, 0, R - self.r[n])) for n in names])
            lora_B = torch.stack([F.pad(self.lora_B_weights[n], (0, R - self.r[n])) for n in names])
            bias_table = None
            if any(n in self.lora_B_biases for n in names):
                zero = torch.zeros(self.out_features, device=device, dtype=self.weight.dtype)
                rows = [self.lora_B_biases[n] * self.scalings[n] if n in self.lora_B_biases else zero for n in names]
                bias_table = torch.stack([r.to(zero.dtype) for r in rows] + [zero])
        ranks = torch.tensor([self.r[n] for n in names], dtype=torch.int32, device=device)
        scalings = torch.tensor([self.scalings[n] for n in names], dtype=torch.float32, device=device)
        return lora_A, lora_B, ranks, scalings, bias_table

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={r})" for n, r in self.r.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"adapters=[{adapters}], active={self.active_adapter!r}, "
            f"backend={self.backend!r}"
        )
