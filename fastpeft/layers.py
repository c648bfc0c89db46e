"""``AdapterLinear``: what every adapter layer shares, whatever its adapter method.

An adapter layer holds a frozen base linear (an ``nn.Linear``, or a GPT-2 style
``Conv1D`` kept in its own ``(in, out)`` layout and handed to the kernels as a transposed
*view*, never copied) and any number of named adapters, one of them active. Subclasses
(LoRA, (IA)^3, bottleneck) own their adapters' tensors and their forward; this class
owns the base, the names, the active adapter and the layer protocol the model-level API
relies on (``adapter_names``, ``set_adapter``, ``merged``, ``to_base_module``,
``row_adapters``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.ops import BACKENDS, autocast_dtype, check_linear_input

__all__ = ["AdapterLinear", "TensorStamp"]

T = TypeVar("T")


def _frozen_parameter(t: torch.Tensor) -> nn.Parameter:
    """A new frozen Parameter sharing ``t``'s storage: the source module keeps its own
    Parameter, flag, dtype and device (``layer.half()`` does not convert it). Injection
    into a model adopts the source's Parameter object instead (``adopt_base_of``)."""
    return nn.Parameter(t.detach(), requires_grad=False)


class TensorStamp:
    """A record of some tensors that tells, later, whether any of them changed.

    A layer keeps a value derived from its tensors (a stacked adapter table, a folded
    weight) for the next forward; it is reused while ``stamp.matches(tensors)``. A change
    is seen when a tensor was updated in place (its version counter moved: optimizer
    steps, ``copy_``), replaced (``.data =``, ``load_state_dict(assign=True)``: its storage
    differs), or moved or cast. The stamp holds each tensor's old storage alive, so a
    replacement can never reuse the old address and look unchanged. Not seen: in-place
    edits through ``.data`` (``p.data.zero_()``: that alias counts versions of its own;
    edit under ``torch.no_grad()`` instead, as optimizers and ``load_state_dict`` do), and
    in-place edits of tensors made under ``torch.inference_mode``, which have no version
    counter (replacing them is seen).

    Eager mode only: ``torch.compile`` cannot trace version counters (nor
    ``is_inference``), so under compile layers trace the derived value from the tensors
    themselves instead of keeping it (``AdapterLinear._kept``).
    """

    __slots__ = ("_held", "_keys")

    def __init__(self, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        self._held = [None if t is None else t.detach() for t in tensors]
        self._keys = [self._key(t) for t in tensors]

    @staticmethod
    def _key(t: Optional[torch.Tensor]) -> Any:
        if t is None:
            return None
        version = None if t.is_inference() else t._version
        return (version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))

    def matches(self, tensors: Sequence[Optional[torch.Tensor]]) -> bool:
        return len(tensors) == len(self._keys) and all(
            self._key(t) == key for t, key in zip(tensors, self._keys)
        )


class AdapterLinear(nn.Module):
    """Base of the adapter layers: frozen ``weight``/``bias`` plus named adapters.

    Subclasses call :meth:`_init_base` first and implement :meth:`_adapter_store`.
    """

    in_features: int
    out_features: int

    # ---------------------------------------------------------------- base

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
        self.weight = _frozen_parameter(weight)
        self.bias = None if bias is None else _frozen_parameter(bias)
        self.active_adapter: Optional[str] = None
        self.merged_adapters: List[str] = []
        # One adapter name (or None) per batch row while ``fastpeft.batch_adapters`` is on.
        self.row_adapters = None

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
    def _linear_parts(linear: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight, bias)`` data of an ``nn.Linear`` (a clear error for anything else)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return linear.weight, linear.bias

    @staticmethod
    def _conv1d_parts(conv: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight, bias)`` data of a transformers ``Conv1D`` (``y = x W + b``, ``W: (in, out)``)."""
        weight = getattr(conv, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not hasattr(conv, "nf"):
            raise TypeError(
                f"from_conv1d expects a transformers Conv1D (weight (in, out), attribute nf), "
                f"got {type(conv).__name__}"
            )
        return weight, getattr(conv, "bias", None)

    def adopt_base_of(self, module: nn.Module) -> None:
        """Hold ``module``'s own ``weight``/``bias`` Parameter objects (the ones this layer
        shares storage with) instead of new ones, so that replacing ``module`` in a model
        keeps a tied weight (lm_head and embed_tokens) one parameter, counted, cast and
        moved once. ``fastpeft.inject`` calls it on the layers it builds."""
        for name in ("weight", "bias"):
            mine, theirs = getattr(self, name), getattr(module, name, None)
            if (
                isinstance(mine, nn.Parameter) and isinstance(theirs, nn.Parameter)
                and theirs.shape == mine.shape and theirs.dtype == mine.dtype
                and theirs.data_ptr() == mine.data_ptr()
            ):
                theirs.requires_grad_(False)
                setattr(self, name, theirs)

    # Values derived from the tensors, kept for the next forward; never copied with the
    # layer (deepcopy, pickling) and dropped when it is moved or cast, so a cache never
    # holds on to an old copy of the base weight.
    _CACHES = ("_eff_cache", "_stack_cache")

    def _drop_caches(self) -> None:
        for name in self._CACHES:
            cache = self.__dict__.get(name)
            if isinstance(cache, dict):
                cache.clear()
            elif cache is not None:
                del self.__dict__[name]

    def _apply(self, fn, recurse: bool = True):
        self._drop_caches()
        out = super()._apply(fn, recurse)
        self._plan_rows()  # the batch's row tensors follow the layer to its new device
        return out

    def _kept(
        self,
        cache_name: str,
        entry: Hashable,
        key: Any,
        tensors: Sequence[Optional[torch.Tensor]],
        build: Callable[[], T],
    ) -> T:
        """``build()``: a value derived from ``tensors`` (and from ``key``, whatever else
        it depends on: scalings, which objects the tensors are), kept in
        ``self.<cache_name>[entry]`` for the next forward while ``key`` is equal and
        ``TensorStamp`` sees no tensor changed, so that decoding step after step builds
        it once.

        Under ``torch.compile`` nothing is kept: the value is traced from the tensors,
        so the compiled graph reads them on every call (a change between calls is always
        seen, with no guard to check) and dynamo never meets a version counter. A value
        that holds an autograd graph is never kept either.
        """
        if torch.compiler.is_compiling():
            return build()
        cache = self.__dict__.setdefault(cache_name, {})
        hit = cache.get(entry)
        if hit is not None and hit[0] == key and hit[1].matches(tensors):
            return hit[2]
        value = build()
        held = value if isinstance(value, (tuple, list)) else (value,)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in held):
            cache[entry] = (key, TensorStamp(tensors), value)
        return value

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self._CACHES:
            if name in state:
                state[name] = {} if isinstance(state[name], dict) else None
        return state

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

    # ---------------------------------------------------------------- adapters

    def _adapter_store(self) -> Mapping[str, Any]:
        """The mapping keyed by this layer's adapter names, in the order they were added."""
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> List[torch.Tensor]:
        """The tensors that belong to one adapter of this layer alone (created with it,
        removed with it): never the shared base."""
        raise NotImplementedError

    @property
    def adapter_names(self) -> List[str]:
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self._adapter_store())

    def _require(self, adapter_name: str) -> None:
        store = self._adapter_store()
        if adapter_name not in store:
            raise KeyError(f"no adapter named {adapter_name!r} in this layer; it has {sorted(store)}")

    def _check_new_name(self, adapter_name: str) -> None:
        """A name ``add_adapter`` can take: a non-empty string (no '.', which would split a
        module path) not in use."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self._adapter_store():
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Make ``adapter_name`` the active adapter; ``None`` runs the base layer only."""
        if adapter_name is not None:
            self._require(adapter_name)
        self.active_adapter = adapter_name

    def _after_add(self, adapter_name: str) -> None:
        """A new adapter is active if none is; a running mixed batch sees it."""
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._plan_rows()

    def _after_delete(self, adapter_name: str) -> None:
        """Hand the active role on when the active adapter was deleted; a running mixed
        batch stops using it."""
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self._adapter_store()), None)
        self._plan_rows()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # Merging: subclasses say what one adapter does to the base (``_fold``) and when it
    # cannot merge (``_check_mergeable``); ``merge`` and ``check_merge`` do the rest.

    def _check_mergeable(self, adapter_name: str) -> None:
        """Raise ``ValueError`` if ``adapter_name`` cannot be folded into this layer."""

    def _fold(
        self, adapter_name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight, bias)`` (storage layout, the base's dtypes) with one adapter folded
        in, as new tensors: the inputs and the layer are left unchanged."""
        raise NotImplementedError

    def _undo_merge(self, adapter_name: str) -> None:
        """Take one merged adapter back out of the base weights (layers that merge)."""
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
        self,
        adapter_name: Optional[str] = None,
        *,
        adapter_names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
    ) -> None:
        """Raise ``ValueError`` if ``merge`` with these arguments would fail or, with
        ``check_finite``, put NaN/inf into the weights (computed on a copy). Changes nothing."""
        names = self._names_to_merge(adapter_name, adapter_names)
        if check_finite and names:
            self._merged_base(names, check_finite=True)

    def merge(
        self,
        adapter_name: Optional[str] = None,
        *,
        safe_merge: bool = False,
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

    def unmerge(self, adapter_name: Optional[str] = None) -> None:
        """Undo merges (exact up to the weight dtype's rounding): every one, newest first,
        or only ``adapter_name``'s (the others stay merged)."""
        if adapter_name is not None:
            if adapter_name in self.merged_adapters:
                self._undo_merge(adapter_name)
                self.merged_adapters.remove(adapter_name)
            return
        while self.merged_adapters:
            self._undo_merge(self.merged_adapters.pop())

    def _check_input(self, x: torch.Tensor) -> None:
        """``x`` fits the base; under ``torch.autocast`` its dtype may differ (the ops and
        ``F.linear`` cast both sides to the autocast dtype, as for ``nn.Linear``)."""
        amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
        check_linear_input(x, self.base_weight(), type(self).__name__, check_dtype=amp is None)

    # ---------------------------------------------------------------- mixed batches
    #
    # The names of a mixed batch are turned into tensors once, when the batch starts
    # (``row_adapters`` is set): the row plan. A forward reads only the plan's tensors,
    # never the names, so it does no per-row Python work on each decode step, and under
    # ``torch.compile`` the rows are graph inputs: one compiled graph serves every batch
    # of the same size and structure, and nothing is specialised on the names.

    @property
    def row_adapters(self) -> Optional[List[Optional[str]]]:
        """One adapter name (or None) per batch row while ``fastpeft.batch_adapters`` is on."""
        return self.__dict__.get("_row_adapters")

    @row_adapters.setter
    def row_adapters(self, names: Optional[Sequence[Optional[str]]]) -> None:
        # Anything a layer keeps for one mixed batch (stacked adapters) ends with it: a new
        # batch sees weights changed in between, even through ``.data``.
        self.__dict__.pop("_stack_cache", None)
        self.__dict__["_row_adapters"] = None if names is None else list(names)
        self._plan_rows()

    def _plan_rows(self) -> Any:
        """(Re)make the row plan of the current mixed batch (None without one) and return it.

        Called when the names are set, and when adapters are added or deleted or the
        layer is moved during a batch. Its tensors are ordinary ones even inside
        ``torch.inference_mode`` (a forward outside it may use them).
        """
        names = self.row_adapters
        if names is None:
            plan = None
        else:
            with torch.inference_mode(False):
                plan = self._make_row_plan(names)
        self.__dict__["_row_plan"] = plan
        return plan

    def _make_row_plan(self, names: Sequence[Optional[str]]) -> Any:
        """The plan of :meth:`_forward_by_row_groups`: ``((name, rows), ...)``, one entry
        per adapter of this layer the batch names (in the layer's order, so that batches
        that differ only in which rows use which adapter share a compiled graph), ``rows``
        the int64 indices of its batch rows on the layer's device. ``None`` or a name
        this layer does not hold: no entry (the base only, as in PEFT)."""
        groups: Dict[str, List[int]] = {name: [] for name in self._adapter_store()}
        for row, name in enumerate(names):
            if name in groups:
                groups[name].append(row)
        device = self.weight.device
        return tuple(
            (name, torch.tensor(rows, device=device, dtype=torch.long)) for name, rows in groups.items() if rows
        )

    @staticmethod
    def _check_rows(x: torch.Tensor, row_adapters: Sequence[Optional[str]]) -> None:
        """A mixed batch names one adapter per row of ``x``'s first dim."""
        if x.dim() < 2 or x.shape[0] != len(row_adapters):
            raise ValueError(
                f"batch_adapters got {len(row_adapters)} adapter names but this layer's input has "
                f"batch size {x.shape[0] if x.dim() else 'none'} (shape {tuple(x.shape)}); "
                "give one name (or None) per batch row"
            )

    def _forward_by_row_groups(
        self,
        x: torch.Tensor,
        run_adapter: Callable[[torch.Tensor, str], torch.Tensor],
    ) -> torch.Tensor:
        """A mixed batch as one sub-batch per adapter: the base for every row, then
        ``run_adapter(rows of x, name)`` for the rows of each adapter this layer holds
        (``None`` or a name it does not hold: the base only, as in PEFT)."""
        self._check_rows(x, self.row_adapters)
        out = F.linear(x, self.base_weight(), self.bias)
        for name, idx in self.__dict__["_row_plan"]:
            out = out.index_copy(0, idx, run_adapter(x.index_select(0, idx), name).to(out.dtype))
        return out
