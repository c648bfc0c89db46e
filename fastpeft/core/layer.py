"""Adapter layers: what every method's layer is to the core, and the frozen-linear base.

:class:`AdapterLayer` is the layer protocol the model-level API (inject, state,
checkpoint, batch plans) works through, whatever the method: named adapters, one module
per adapter in ``self.adapters`` (created with the adapter, removed with it), one of them
active, merged ones, the batch plan of a mixed batch, and ``to_base_module()`` (what
``unload`` puts back). A method's layer subclasses it and adds its forward, and, if the
method merges, ``merge``/``_undo_merge``.

:class:`AdapterLinear` adds a frozen base linear (an ``nn.Linear``, or a GPT-2 style
``Conv1D`` kept in its own ``(in, out)`` layout and handed to the kernels as a transposed
*view*, never copied): the base of the layers that swap a leaf linear module.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastpeft.core.batch import BatchPlan
from fastpeft.core.dispatch import BACKENDS, autocast_dtype, check_linear_input

__all__ = ["AdapterLayer", "AdapterLinear", "HookedLayer", "ModuleWrapper", "PlanReader", "TensorStamp"]


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


class PlanReader:
    """The batch plan of a mixed batch, as a layer reads it (None: no mixed batch)."""

    batch_plan: Optional[BatchPlan] = None

    @property
    def row_adapters(self) -> Optional[List[Optional[str]]]:
        """One adapter name (or None) per batch row while a mixed batch runs."""
        plan = self.batch_plan
        return None if plan is None else list(plan.rows)

    @row_adapters.setter
    def row_adapters(self, names: Optional[Sequence[Optional[str]]]) -> None:
        """A mixed batch over this layer alone (no provider): ``fastpeft.batch_adapters``
        sets one plan on every layer of a model instead."""
        self.batch_plan = None if names is None else BatchPlan(names)


class AdapterLayer(PlanReader, nn.Module):
    """Named adapters (``self.adapters``, one module per adapter), one active.

    Subclasses call :meth:`_init_adapters` in their constructor, fill ``self.adapters``
    through their own ``add_adapter`` (checking the name with :meth:`_check_new_name` and
    calling :meth:`_added` at the end), and implement ``forward`` and ``to_base_module``.
    Methods that merge implement ``merge`` and ``_undo_merge``.
    """

    adapters: nn.ModuleDict

    # Values derived from the tensors, kept for the next forward (dicts; an entry keyed
    # by an adapter's name goes with the adapter); never copied with the layer
    # (deepcopy, pickling) and dropped when it is moved or cast, so a cache never holds
    # on to an old copy of a weight.
    _CACHES: Tuple[str, ...] = ()

    def _init_adapters(self) -> None:
        self.adapters = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.merged_adapters: List[str] = []
        self.batch_plan = None
        for name in self._CACHES:
            self.__dict__[name] = {}

    # ---------------------------------------------------------------- caches

    def _apply(self, fn, recurse: bool = True):
        for name in self._CACHES:
            self.__dict__.get(name, {}).clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self._CACHES:
            if name in state:
                state[name] = {}
        return state

    # ---------------------------------------------------------------- adapters

    @property
    def adapter_names(self) -> List[str]:
        """Names of the adapters this layer holds, in the order they were added."""
        return list(self.adapters)

    def adapter_parameters(self, adapter_name: str) -> List[torch.Tensor]:
        """The tensors that belong to one adapter of this layer alone (created with it,
        removed with it): never the shared base."""
        self._require(adapter_name)
        return list(self.adapters[adapter_name].parameters())

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise KeyError(f"no adapter named {adapter_name!r} in this layer; it has {sorted(self.adapters)}")

    def _check_new_name(self, adapter_name: str) -> None:
        """A name ``add_adapter`` can take: a non-empty string (no '.', which would split a
        module path) not in use."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")

    def _added(self, adapter_name: str, adapter: nn.Module) -> None:
        """Store a new adapter's module; the first one becomes active."""
        self.adapters[adapter_name] = adapter
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Make ``adapter_name`` the active adapter; ``None`` runs the base layer only."""
        if adapter_name is not None:
            self._require(adapter_name)
        self.active_adapter = adapter_name

    def _active(self) -> str:
        if self.active_adapter is None:
            raise AttributeError("this layer has no active adapter (set_adapter(None) was called)")
        return self.active_adapter

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; unmerges it first if it is merged. The active role passes
        to the first remaining adapter."""
        self._require(adapter_name)
        if adapter_name in self.merged_adapters:
            self._undo_merge(adapter_name)
            self.merged_adapters.remove(adapter_name)
        del self.adapters[adapter_name]
        for name in self._CACHES:
            self.__dict__.get(name, {}).pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.adapters), None)

    # ---------------------------------------------------------------- merge

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_name: Optional[str] = None) -> None:
        raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def _undo_merge(self, adapter_name: str) -> None:
        """Take one merged adapter back out of the base weights (layers that merge)."""
        raise NotImplementedError

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

    def to_base_module(self) -> Optional[nn.Module]:
        """The module ``unload`` puts back in this layer's place (None: remove it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- placement

    def attach(self, model: nn.Module) -> None:
        """Called by the core once this layer is in ``model`` (a new layer only)."""

    def detach(self) -> None:
        """Called by the core before this layer leaves the model (undo, unload)."""


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

    def _forward_by_row_groups(
        self, x: torch.Tensor, plan: BatchPlan, run_adapter: Callable[[torch.Tensor, str], torch.Tensor]
    ) -> torch.Tensor:
        """A mixed batch as one sub-batch per adapter: the base for every row, then
        ``run_adapter(rows of x, name)`` for the rows of each adapter this layer holds
        (``None`` or a name it does not hold: the base only, as in PEFT)."""
        plan.check_batch(x)
        out = F.linear(x, self.base_weight(), self.bias)
        groups: Dict[str, List[int]] = {}
        for row, name in enumerate(plan.rows):
            if name is not None and name in self.adapters:
                groups.setdefault(name, []).append(row)
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device, dtype=torch.long)
            out = out.index_copy(0, idx, run_adapter(x.index_select(0, idx), name).to(out.dtype))
        return out


class ModuleWrapper(AdapterLayer):
    """Adapter layer around a whole module (an embedding, an attention block): the
    original is kept as ``base_layer`` (frozen by inject; its state-dict keys under
    ``<path>.base_layer.``) and put back by ``unload``. Attributes the model reads from
    the wrapped module (``embed_tokens.weight``, ``self_attn.config``) are forwarded."""

    def _init_wrapper(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self._init_adapters()

    def to_base_module(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)


class HookedLayer(AdapterLayer):
    """Adapter layer that changes a model through forward hooks, not by standing in for a
    module: inject adds it to the model as a child (at the method's ``hook_site``, so its
    parameters are the model's) and calls :meth:`attach`, which registers the hooks that
    :meth:`hooks` returns; ``detach`` (undo, unload) removes them again."""

    def _init_hooks(self) -> None:
        self._init_adapters()
        self.__dict__["_handles"] = []

    def hooks(self, model: nn.Module) -> List[Any]:
        """Register this layer's hooks on ``model``; return their removable handles."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self.__dict__["_handles"] = list(self.hooks(model))

    def detach(self) -> None:
        for handle in self.__dict__.get("_handles", ()):
            handle.remove()
        self.__dict__["_handles"] = []

    def to_base_module(self) -> None:
        return None
