"""Adapter layers: what every method's layer is to the core.

:class:`AdapterLayer` is the layer protocol the model-level API (inject, state,
checkpoint, batch plans) works through, whatever the method: named adapters, one module
per adapter in ``self.adapters`` (created with the adapter, removed with it), one of them
active, merged ones, the batch plan of a mixed batch, and ``to_base_module()`` (what
``unload`` puts back). A method's layer subclasses it (or one of the bases for each way
of attaching: ``fastpeft.core.linear.AdapterLinear`` for a swapped leaf linear,
:class:`ModuleWrapper` for a wrapped module, :class:`HookedLayer` for forward hooks) and
adds its forward, and, if the method merges, ``merge``/``_undo_merge``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn

from fastpeft.core.batch import BatchPlan

__all__ = ["AdapterLayer", "HookedLayer", "ModuleWrapper", "PlanReader", "TensorStamp"]

T = TypeVar("T")


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
    themselves instead of keeping it (``AdapterLayer._kept``).
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
        keys = self._keys
        if len(tensors) != len(keys):
            return False
        for t, key in zip(tensors, keys):  # a loop, not all(<genexpr>): checked on every decode step
            if self._key(t) != key:
                return False
        return True


class PlanReader:
    """A layer that takes part in mixed batches: the batch plan (None: no mixed batch)
    and the layer's own *row plan*, made from it once when the batch starts.

    The row plan holds what the forward reads, as tensors (each row's slot, each
    adapter's rows), so a forward does no per-row Python work on each decode step, and
    under ``torch.compile`` the rows are graph inputs: one compiled graph serves every
    batch of the same size and structure, and nothing is specialised on the names. It is
    made again when the layer's adapters change or the layer moves during a batch.
    """

    @property
    def batch_plan(self) -> Optional[BatchPlan]:
        return self.__dict__.get("_batch_plan")

    @batch_plan.setter
    def batch_plan(self, plan: Optional[BatchPlan]) -> None:
        self.__dict__["_batch_plan"] = plan
        self._plan_rows()

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

    def _plan_rows(self) -> Any:
        """(Re)make the row plan of the current batch (None without one) and return it.
        Its tensors are ordinary ones even inside ``torch.inference_mode`` (a forward
        outside it may use them)."""
        plan = self.batch_plan
        if plan is None:
            rows = None
        else:
            with torch.inference_mode(False):
                rows = self._make_row_plan(plan)
        self.__dict__["_row_plan"] = rows
        return rows

    def _make_row_plan(self, plan: BatchPlan) -> Any:
        """What this layer's forward reads of a batch plan (default: the plan itself)."""
        return plan


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
        for name in self._CACHES:
            self.__dict__[name] = {}

    # ---------------------------------------------------------------- caches

    def _apply(self, fn, recurse: bool = True):
        for name in self._CACHES:
            self.__dict__.get(name, {}).clear()
        out = super()._apply(fn, recurse)
        self._plan_rows()  # the batch's row tensors follow the layer to its new device
        return out

    def _kept(
        self, cache_name: str, entry: Hashable, key: Any, tensors: Sequence[Optional[torch.Tensor]],
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
        that holds an autograd graph is never kept either, and whether the call needs one
        (grad enabled, a source tensor that requires grad) is part of the key: a value
        kept from a ``no_grad`` call must not cut the adapters out of a later backward.
        """
        if torch.compiler.is_compiling():
            return build()
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        key = (key, needs_graph)
        cache = self.__dict__.setdefault(cache_name, {})
        hit = cache.get(entry)
        if hit is not None and hit[0] == key and hit[1].matches(tensors):
            return hit[2]
        value = build()
        if isinstance(value, (tuple, list)):
            held = tuple(value)
        elif dataclasses.is_dataclass(value):
            held = tuple(vars(value).values())
        else:
            held = (value,)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in held):
            cache[entry] = (key, TensorStamp(tensors), value)
        return value

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
        """Store a new adapter's module; the first one becomes active; a running mixed
        batch sees it."""
        self.adapters[adapter_name] = adapter
        if self.active_adapter is None:
            self.active_adapter = adapter_name
        self._plan_rows()

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
        self._plan_rows()  # a running mixed batch stops using it

    # ---------------------------------------------------------------- merge

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        """Fold adapters into the base weights (layers that merge: ``AdapterLinear``)."""
        self.check_merge(adapter_name, **kwargs)

    def check_merge(self, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        """Raise ``ValueError`` if ``merge`` with these arguments would fail. Changes nothing."""
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
