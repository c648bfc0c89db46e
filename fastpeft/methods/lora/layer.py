"""``FastLoRALinear``: a drop-in ``nn.Linear`` with one or more LoRA adapters.

The frozen base lives in ``weight``/``bias``; each named adapter is one
:class:`LoraAdapter` module in ``adapters`` holding ``lora_A (r, in)`` and ``lora_B (out,
r)`` in PEFT's layout (and, with ``lora_bias``, PEFT's ``lora_B.bias``). ``layer.lora_A``,
``layer.lora_B`` and ``layer.scaling`` are the active adapter's. The forward of the active
adapter is one call of the fused op (``fastpeft.methods.lora.op``); a mixed batch is one
call of the mixed-adapter op over slot stacks (``fastpeft.methods.lora.stacks``). A
DoRA adapter (``use_dora``) also holds ``lora_magnitude_vector``; what DoRA adds (norms,
forward, merge, mixed batches) comes from ``DoraLayerMixin`` (``dora_layer.py``).

A layer made from a GPT-2 style ``Conv1D`` (``fan_in_fan_out``) keeps the Conv1D's
``(in, out)`` weight tensor as is and hands the op a transposed *view* of it: the kernel
reads through strides, so no copy of the base weight is ever made.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Hashable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.dispatch import autocast_cast, autocast_dtype, check_linear_input, resolve_backend
from fastpeft.core.batch import BatchPlan, check_rows
from fastpeft.core.linear import AdapterLinear
from fastpeft.kernels.runtime import lowp_copy
from fastpeft.methods.lora.config import lora_scaling
from fastpeft.methods.lora.dora_layer import DORA_CACHES, DoraLayerMixin
from fastpeft.methods.lora.multi_op import multi_lora_linear, multi_lora_linear_unchecked, row_slots_for_tokens
from fastpeft.methods.lora.op import dropout_seed, lora_linear_unchecked
from fastpeft.methods.lora.stacks import SlotRows, SlotStacks, batch_meta, stack_adapters

__all__ = ["FastLoRALinear", "LoraAdapter", "LoraRowPlan"]

_autocast_on = torch._C._is_any_autocast_enabled

InitSpec = Union[bool, str]


@dataclass(frozen=True)
class LoraRowPlan:
    """A mixed batch's rows for one LoRA layer, made once when the batch starts.

    ``provided``: a provider's slot stacks (the pool's) or None (this layer's own
    adapters, all of them stacked); ``row_slot``: ``(B,)`` int32 slot of each batch row
    (-1: base only), None when the layer has no adapter to run; ``used``: some row has an
    adapter here (eager runs a batch with none as a plain linear; a compiled graph runs
    the mixed op for every batch, so that which rows use this layer stays data);
    ``batch`` and ``key``: the batch plan and the slot assignment, under which eager
    forwards share the kernel metadata across layers.
    """

    batch: BatchPlan
    num_rows: int
    provided: Optional[SlotStacks]
    row_slot: Optional[torch.Tensor]
    used: bool
    key: Hashable


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
    ``use_dora`` adds DoRA's ``lora_magnitude_vector`` ``(out,)`` (the layer sets it to
    the row norms of ``W + s B A``: ``DoraLayerMixin``).
    """

    def __init__(
        self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: InitSpec = True, lora_bias: bool = False,
        device=None, dtype=None, use_dora: bool = False,
    ) -> None:
        super().__init__()
        _check_rank(r)
        if use_dora and lora_bias:
            raise ValueError("DoRA (use_dora=True) with lora_bias=True is not supported")
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
        self.lora_magnitude_vector: Optional[nn.Parameter] = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, **factory))
        # DoRA: the norm an adapter was merged with, for the unmerge (moves with the
        # layer, never saved).
        self.register_buffer("dora_merge_norm", None, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``, computed in fp32, shape ``(out, in)``."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling}, "
                f"lora_bias={self.lora_bias is not None}, use_dora={self.lora_magnitude_vector is not None}")


class FastLoRALinear(DoraLayerMixin, AdapterLinear):
    """Linear layer ``y = x W^T + b + s * (dropout(x) A^T) B^T`` with fused kernels.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        r, lora_alpha, lora_dropout, use_rslora: the first adapter (named
            ``adapter_name``), as PEFT's ``LoraConfig`` defines them.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
            PyTorch reference), ``"triton"`` or ``"torch"``.
    """

    _CACHES = ("_stack_cache", "_lowp_cache", "_bias_cache") + DORA_CACHES

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
        lora_bias: bool = False, backend: str = "auto", use_dora: bool = False,
    ) -> "FastLoRALinear":
        """Wrap an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (``y = x W + b``, ``W: (in,
        out)``: PEFT's ``fan_in_fan_out``, kept in its layout): the new layer shares the
        module's weight and bias tensors (no copy)."""
        _check_rank(r)
        parts, fan_in_fan_out, base_cls = cls.base_parts(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_base(*parts, fan_in_fan_out=fan_in_fan_out, base_cls=base_cls, backend=backend)
        layer.add_adapter(
            adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, lora_bias=lora_bias,
            use_dora=use_dora,
        )
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
        use_dora: bool = False,
    ) -> None:
        """Add an adapter (and make it active if none is); see :class:`LoraAdapter`."""
        self._check_new_name(adapter_name)
        adapter = LoraAdapter(
            self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
            lora_bias, device=self.weight.device, dtype=self.weight.dtype, use_dora=use_dora,
        )
        self._added(adapter_name, adapter)
        if use_dora:
            self._init_magnitude(adapter_name)

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

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], sign: float = 1.0
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``W + sign * s B A`` (and ``b + sign * s lora_bias``): fp32 math, stored in
        the base dtypes, as new tensors."""
        adapter = self.adapters[adapter_name]
        if adapter.lora_magnitude_vector is not None:
            return self._dora_fold(adapter_name, weight, sign), bias
        delta = adapter.delta_weight()
        if self.fan_in_fan_out:
            delta = delta.t()
        weight = (weight.float() + sign * delta).to(weight.dtype)
        if adapter.lora_bias is not None:
            bias = (bias.float() + sign * adapter.lora_bias.detach().float() * adapter.scaling).to(bias.dtype)
        return weight, bias

    def _check_mergeable(self, adapter_name: str) -> None:
        if self.adapters[adapter_name].lora_bias is not None and self.bias is None:
            # As PEFT: there is no base bias to fold lora_B.bias into.
            raise ValueError(
                f"cannot merge adapter {adapter_name!r}: it has lora_bias=True but the base layer has no bias"
            )

    def _undo_merge(self, adapter_name: str) -> None:
        self._write_base(*self._fold(adapter_name, self.weight.detach(), self.bias, -1.0))

    # ---------------------------------------------------------------- forward

    def _effective_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Base bias plus ``s * lora_bias`` (PEFT scales ``lora_B``'s output, bias included).

        A tiny torch op outside the kernel, so autograd reaches ``lora_bias`` through the
        op's bias gradient; without a graph to build it is kept while the tensors and the
        scaling are unchanged (``_kept``), not recomputed per call.
        """
        adapter = self.adapters[adapter_name]
        if adapter.lora_bias is None:
            return self.bias
        bias, lora_bias, scaling, dtype = self.bias, adapter.lora_bias, adapter.scaling, self.weight.dtype

        def build() -> torch.Tensor:
            # An fp32 lora_bias on a half model (autocast_adapter_dtype) joins in the base's dtype.
            scaled = (lora_bias * scaling).to(dtype)
            return scaled if bias is None else bias + scaled

        return self._kept("_bias_cache", adapter_name, (scaling, dtype), (bias, lora_bias), build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters and modules read from their dicts: nn.Module.__getattr__ is a Python
        # call per attribute, a good part of a decode step's host time.
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        if self.fan_in_fan_out:
            weight = weight.t()
        amp = autocast_dtype(x.device) if _autocast_on() and isinstance(x, torch.Tensor) else None
        if amp is not None:  # torch.autocast: run in its dtype, as nn.Linear does
            x, weight, bias = autocast_cast(amp, x, weight, bias)
        check_linear_input(x, weight, type(self).__name__)
        rows = self.__dict__.get("_row_plan")
        if rows is not None:
            return self._mixed_forward(x, rows, weight, bias)
        name = self.active_adapter
        if name is None or self.merged_adapters:
            # The base (with any merged adapters folded in) is a plain linear: cuBLAS.
            return F.linear(x, weight, bias)
        adapter = self._modules["adapters"]._modules[name]
        ap = adapter._parameters
        lora_A, lora_B = ap["lora_A"], ap["lora_B"]
        x_lora, dropout_p, seed = None, 0.0, None
        if self.training:
            dropout = adapter._modules["dropout"]
            if isinstance(dropout, nn.Dropout):
                if adapter.lora_magnitude_vector is None and resolve_backend(self.backend, x.device, x.dtype) == "triton":
                    # The kernels draw the mask from a seed taken from torch's RNG (so that
                    # checkpointing's RNG restore redraws it) and never store it. (DoRA's
                    # forward takes the dropped-out input itself.)
                    dropout_p, seed = dropout.p, dropout_seed(x.device)
                else:
                    x_lora = dropout(x)
        eff_bias = bias if ap.get("lora_bias") is None else self._effective_bias(name)
        if amp is not None:
            eff_bias, lora_A, lora_B = autocast_cast(amp, eff_bias, lora_A, lora_B)
        copy = None
        if lora_A.dtype != x.dtype:
            copy = functools.partial(self._shrink_copy, name, lora_A, x.dtype)
        if adapter.lora_magnitude_vector is not None:
            return self._dora_forward(name, x, weight, eff_bias, lora_A, lora_B, x_lora)
        # x is checked above and the adapter's shapes are the layer's own (add_adapter and
        # checkpoint loading check them): skip the op's second round of checks.
        return lora_linear_unchecked(
            x, weight, eff_bias, lora_A, lora_B, adapter.scaling, x_lora, self.backend, dropout_p, seed, shrink_copy=copy
        )

    def _shrink_copy(self, name: str, lora_A: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``lora_A`` (fp32, on a 16-bit input) in ``dtype`` for the kernels' in-loop
        shrink (``runtime.lowp_copy``: None where it would overflow), kept per adapter
        while ``lora_A`` is unchanged (``_kept``: optimizer steps, ``load_state_dict``,
        ``.data`` swaps rebuild it). Only the no-autograd path asks for it. fp16 keeps the
        10 mantissa bits the fp32 branch's tf32 dots keep; bf16 rounds ``A`` to 8, an error
        of the order of the bf16 output's own rounding."""
        return self._kept("_lowp_cache", name, dtype, (lora_A,), lambda: lowp_copy(lora_A, dtype))

    def _make_row_plan(self, plan: BatchPlan) -> LoraRowPlan:
        """Where the rows of a mixed batch take their adapters from, as tensors: a
        provider's slots (the pool put them in the plan for this layer), or the position
        of each row's adapter among this layer's adapters (the order they are stacked
        in); ``None`` or a name this layer does not hold: -1, the base only, as in PEFT
        (the adapter did not target this layer). The stacks kept from an earlier batch
        go: a new batch sees weights changed in between, even through ``.data``."""
        self._stack_cache.clear()
        self.__dict__.get("_dora_table_cache", {}).clear()
        device, n = self.weight.device, len(plan.rows)
        given: Optional[SlotRows] = plan.provided.get(self)
        if given is not None:
            return LoraRowPlan(plan, n, given.stacks, given.batch_slot.to(device), True, given.key)
        if not self.adapters:
            return LoraRowPlan(plan, n, None, None, False, None)
        index = {name: i for i, name in enumerate(self.adapters)}
        slots = tuple(index.get(name, -1) for name in plan.rows)
        row_slot = torch.tensor(slots, dtype=torch.int32, device=device)
        return LoraRowPlan(plan, n, None, row_slot, any(s >= 0 for s in slots), ("layer", slots, len(index)))

    def _mixed_forward(
        self, x: torch.Tensor, rows: LoraRowPlan, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Each batch row (``x``'s dim 0) through its own adapter, as the row plan says;
        ``weight``/``bias``: the base as ``forward`` casts it (autocast).

        One fused mixed-adapter kernel call over slot stacks: a provider's, or all of this
        layer's adapters stacked (``_batch_stacks``). The kernel metadata is shared by the
        layers of one forward (eager) or built in the graph from the rows' slots (under
        ``torch.compile``, so no names are baked into it). A ``lora_bias`` adds
        ``s * lora_bias`` to its rows afterwards.
        """
        if self.training:
            raise RuntimeError(
                "mixed-adapter batches (fastpeft.batch_adapters) run in eval mode only, as PEFT's "
                "adapter_names=: call model.eval() first"
            )
        if self.merged_adapters:
            raise RuntimeError("mixed-adapter batches need unmerged adapters: call fastpeft.unmerge(model) first")
        check_rows(x, rows.num_rows)
        # (is_compiling first: a compiled graph never reads, nor guards on, ``used``)
        if rows.row_slot is None or not (torch.compiler.is_compiling() or rows.used):
            return F.linear(x, weight, bias)
        stacks = rows.provided if rows.provided is not None else self._batch_stacks(x.device)
        compiling = torch.compiler.is_compiling()
        if compiling:
            meta = row_slots_for_tokens(rows.row_slot, x)
        else:
            meta = batch_meta(rows.batch, rows.key, rows.row_slot, stacks.lora_A.shape[0], x)
        table = self._dora_table() if rows.provided is None else stacks.mag_table
        if table is not None:  # DoRA slots: their column scales in the mixed kernel's epilogue
            return self._dora_mixed(x, weight, bias, stacks, meta, rows.row_slot, table)
        if compiling:
            out = multi_lora_linear(
                x, weight, bias, stacks.lora_A, stacks.lora_B, stacks.ranks, stacks.scalings, meta,
                backend=self.backend, check=False,
            )
        else:  # stacks and metadata made for this layer and batch: no second round of checks
            out = multi_lora_linear_unchecked(
                x, weight, bias, stacks.lora_A, stacks.lora_B, stacks.ranks, stacks.scalings, meta, self.backend
            )
        if stacks.bias_table is not None:
            # PEFT scales lora_B's output, bias included: add s_i * lora_bias_i to row i
            # (the table's last row is zeros, for the rows with no adapter here).
            table, slot = stacks.bias_table, rows.row_slot.long()
            per_row = table[torch.where(slot < 0, table.shape[0] - 1, slot)]
            out = out + per_row.to(out.dtype).reshape(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
        return out

    def _batch_stacks(self, device: torch.device) -> SlotStacks:
        """All of this layer's adapters in slots (in their order), kept for the next
        forward while their tensors and scalings are unchanged (``_kept``: in-place
        updates, ``.data`` swaps), so decoding step after step with one batch stacks and
        uploads once, not once per step and layer; under ``torch.compile`` the stacking
        is part of the graph."""
        adapters = list(self.adapters.values())
        tensors = [t for a in adapters for t in (a.lora_A, a.lora_B, a.lora_bias) if t is not None]
        key = (tuple(map(id, tensors)), tuple([a.scaling for a in adapters]))
        return self._kept(
            "_stack_cache", device, key, tensors, lambda: stack_adapters(adapters, device, self.weight.dtype)
        )

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={a.r})" for n, a in self.adapters.items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}, "
            f"adapters=[{adapters}], active={self.active_adapter!r}, "
            f"backend={self.backend!r}"
        )
