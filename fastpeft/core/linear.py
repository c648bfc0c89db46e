"""``AdapterLinear``: the adapter layer over a frozen base linear (leaf-swap methods).

The base is an ``nn.Linear``, or a GPT-2 style ``Conv1D`` kept in its own ``(in, out)``
layout and handed to the kernels as a transposed *view*, never copied. This class owns
the base, merging (a subclass says what one adapter does to the base, ``_fold``, and when
it cannot, ``_check_mergeable``; ``merge``/``check_merge`` do the rest, all or nothing,
``safe_merge`` as PEFT's) and mixed batches run as one sub-batch per adapter
(``_forward_by_row_groups``, over the layer's row plan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.batch import BatchPlan, check_rows
from fastpeft.core.dispatch import BACKENDS, autocast_dtype, check_linear_input
from fastpeft.core.layer import AdapterLayer

__all__ = ["AdapterLinear", "RowGroups"]


@dataclass(frozen=True)
class RowGroups:
    """A mixed batch's rows for one layer that runs a sub-batch per adapter:
    ``((name, rows), ...)``, one entry per adapter of the layer the batch names (in the
    layer's order, so that batches that differ only in which rows use which adapter share
    a compiled graph), ``rows`` the int64 indices of its batch rows on the layer's
    device; ``num_rows``: the batch size."""

    num_rows: int
    groups: Tuple[Tuple[str, torch.Tensor], ...]


class AdapterLinear(AdapterLayer):
    """Adapter layer over a frozen base linear: ``weight``/``bias`` plus named adapters.

    Subclasses call :meth:`_init_base` first.
    """

    in_features: int
    out_features: int

    def _init_base(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        *,
        fan_in_fan_out: bool = False,
        base_cls: type = nn.Linear,
        backend: str = "auto",
    ) -> None:
        """Adopt ``weight`` (``(out, in)``; ``(in, out)`` with ``fan_in_fan_out``) and
        ``bias`` as the frozen base, sharing their storage."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.fan_in_fan_out = fan_in_fan_out
        self.base_cls = base_cls
        if fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.backend = backend
        # New frozen Parameters sharing the storage: the source module keeps its own
        # Parameter, flag, dtype and device (``layer.half()`` does not convert it).
        # Injection into a model adopts the source's Parameters instead (adopt_base_of).
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._init_adapters()

    @staticmethod
    def _new_linear_tensors(
        in_features: int, out_features: int, bias: bool, device: Any = None, dtype: Any = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A fresh ``(weight, bias)`` initialised as ``nn.Linear`` does, so a layer built
        from sizes is a usable linear layer before any checkpoint is loaded."""
        factory = {"device": device, "dtype": dtype}
        weight = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        b = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            b = torch.empty(out_features, **factory).uniform_(-bound, bound)
        return weight, b

    @staticmethod
    def base_parts(module: nn.Module) -> Tuple[Tuple[torch.Tensor, Optional[torch.Tensor]], bool, type]:
        """``((weight, bias), fan_in_fan_out, base class)`` of an ``nn.Linear`` or a
        transformers ``Conv1D`` (``y = x W + b``, ``W: (in, out)``: always fan_in_fan_out,
        whatever a config says, as PEFT); a clear error for anything else."""
        if isinstance(module, nn.Linear):
            return (module.weight, module.bias), False, nn.Linear
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not hasattr(module, "nf"):
            raise TypeError(
                f"expected an nn.Linear or a transformers Conv1D (weight (in, out), attribute nf), "
                f"got {type(module).__name__}"
            )
        return (weight, getattr(module, "bias", None)), True, type(module)

    def adopt_base_of(self, module: nn.Module) -> None:
        """Hold ``module``'s own ``weight``/``bias`` Parameter objects (the ones this layer
        shares storage with) instead of new ones, so that replacing ``module`` in a model
        keeps a tied weight (lm_head and embed_tokens) one parameter, counted, cast and
        moved once. ``fastpeft.inject`` calls it on the layers that swap a module."""
        for name in ("weight", "bias"):
            mine, theirs = getattr(self, name), getattr(module, name, None)
            if (
                isinstance(mine, nn.Parameter) and isinstance(theirs, nn.Parameter)
                and theirs.shape == mine.shape and theirs.dtype == mine.dtype
                and theirs.data_ptr() == mine.data_ptr()
            ):
                theirs.requires_grad_(False)
                setattr(self, name, theirs)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``(out_features, in_features)``: a transposed view for Conv1D."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def to_base_module(self) -> nn.Module:
        """The plain layer this one wraps (``nn.Linear``, or a ``Conv1D`` in its own layout),
        sharing ``weight``/``bias`` tensors; adapters not merged are dropped."""
        with torch.device("meta"):  # no throw-away allocation: the tensors are replaced below
            if self.fan_in_fan_out:
                base = self.base_cls(self.out_features, self.in_features)  # Conv1D(nf, nx)
            else:
                base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight = self.weight
        base.bias = self.bias
        return base

    def _check_input(self, x: torch.Tensor) -> None:
        """``x`` fits the base; under ``torch.autocast`` its dtype may differ (the ops and
        ``F.linear`` cast both sides to the autocast dtype, as for ``nn.Linear``)."""
        amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        check_linear_input(x, self.base_weight(), type(self).__name__, check_dtype=amp is None)

    # ---------------------------------------------------------------- merge

    def _check_mergeable(self, adapter_name: str) -> None:
        """Raise ``ValueError`` if ``adapter_name`` cannot be folded into this layer."""

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight, bias)`` (storage layout, the base's dtypes) with one adapter folded
        in, as new tensors: the inputs and the layer are left unchanged."""
        raise NotImplementedError

    def _names_to_merge(self, adapter_name: Optional[str], adapter_names: Optional[Sequence[str]]) -> List[str]:
        """The adapters a merge folds in, in order (default: the active one), less those
        already merged; each checked with ``_check_mergeable``."""
        if adapter_name is not None and adapter_names is not None:
            raise TypeError("give adapter_name or adapter_names, not both")
        if adapter_names is None:
            adapter_names = [adapter_name if adapter_name is not None else self.active_adapter]
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of names, got the string {adapter_names!r}")
        names: List[str] = []
        for name in adapter_names:
            if name is None:
                raise ValueError("no adapter to merge: this layer has no active adapter")
            self._require(name)
            if name not in self.merged_adapters and name not in names:
                self._check_mergeable(name)
                names.append(name)
        return names

    def _merged_base(self, names: Sequence[str], check_finite: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The base ``(weight, bias)`` with ``names`` folded in, computed aside. With
        ``check_finite``, ``ValueError`` if the result holds NaN or inf."""
        with torch.no_grad():
            weight, bias = self.weight.detach(), None if self.bias is None else self.bias.detach()
            for name in names:
                weight, bias = self._fold(name, weight, bias)
            if check_finite and not (
                bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))
            ):
                raise ValueError(
                    f"merging adapter(s) {list(names)} would put NaN or inf into the base weights (a broken "
                    f"adapter, or values beyond the range of {self.weight.dtype}); nothing was merged"
                )
        return weight, bias

    def check_merge(
        self, adapter_name: Optional[str] = None, *, adapter_names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
    ) -> None:
        """Raise ``ValueError`` if ``merge`` with these arguments would fail or, with
        ``check_finite``, put NaN/inf into the weights (computed on a copy). Changes nothing."""
        names = self._names_to_merge(adapter_name, adapter_names)
        if check_finite and names:
            self._merged_base(names, check_finite=True)

    def merge(
        self, adapter_name: Optional[str] = None, *, safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
    ) -> None:
        """Fold the active (or named) adapter(s) into the base ``weight`` and ``bias``.

        ``adapter_names``: several adapters, folded in that order (PEFT's argument).
        ``safe_merge`` (PEFT's option): the merged weights are computed on a copy and
        checked first; NaN or inf raises ``ValueError`` and the layer stays unmerged.
        Merging is all-or-nothing either way: the result is computed aside, then copied in.
        """
        names = self._names_to_merge(adapter_name, adapter_names)
        if not names:
            return
        self._write_base(*self._merged_base(names, check_finite=safe_merge))
        self.merged_adapters.extend(names)

    def _write_base(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Copy new values into the base ``weight`` (and ``bias``, unless None) in place,
        so that tied and shared tensors follow. A model built under
        ``torch.inference_mode`` holds inference tensors, written through ``.data``."""
        with torch.no_grad():
            for dst, value in ((self.weight, weight), (self.bias, bias)):
                if value is not None:
                    (dst.data if dst.is_inference() else dst).copy_(value)

    # ---------------------------------------------------------------- mixed batches

    def _make_row_plan(self, plan: BatchPlan) -> RowGroups:
        groups: Dict[str, List[int]] = {name: [] for name in self.adapters}
        for row, name in enumerate(plan.rows):
            if name in groups:
                groups[name].append(row)
        device = self.weight.device
        return RowGroups(len(plan.rows), tuple(
            (name, torch.tensor(rows, device=device, dtype=torch.long)) for name, rows in groups.items() if rows
        ))

    def _forward_by_row_groups(self, x: torch.Tensor, run_adapter: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """A mixed batch as one sub-batch per adapter: the base for every row, then
        ``run_adapter(rows of x, name)`` for the rows of each adapter this layer holds
        (``None`` or a name it does not hold: the base only, as in PEFT)."""
        plan: RowGroups = self.__dict__["_row_plan"]
        check_rows(x, plan.num_rows)
        out = F.linear(x, self.base_weight(), self.bias)
        for name, idx in plan.groups:
            out = out.index_copy(0, idx, run_adapter(x.index_select(0, idx), name).to(out.dtype))
        return out
