"""Per-row batch plans: one mixed batch, each row with its own adapter (or none).

``fastpeft.batch_adapters(model, names)`` builds one :class:`BatchPlan` and hands the same
object to every adapter layer of the model; a layer reads it in its forward and never
asks anyone else. A plan holds

* ``rows``: the adapter name (or None: the base model) of each batch row, i.e. of each
  index of dim 0 of every layer input;
* ``provided``: what a :class:`BatchProvider` (the serving ``AdapterPool``) supplies per
  layer, e.g. the pool's fixed slot stacks and the slot of each row; a layer that finds
  nothing there uses the adapters it holds itself;
* values derived once per forward of the model and shared by all layers
  (:meth:`BatchPlan.derived`): e.g. the mixed-adapter kernel's metadata (rows sorted by
  adapter, segments), keyed by the row-token shape, so a 32-layer model builds it once
  per step, not 32 times.

Running example: ``rows = ("a", None, "b", "a")`` over a ``(4, T, K)`` input. A LoRA layer
holding ``a`` and ``b`` stacks them in slots 0 and 1, so each batch row's slot is
``(0, -1, 1, 0)`` and every token row of that batch row inherits it; the metadata for
``T`` tokens per row is built by the first layer and found by the others.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Dict, Hashable, Iterator, Mapping, Optional, Protocol, Sequence, Tuple

import torch.nn as nn

__all__ = ["BatchPlan", "BatchProvider", "check_rows"]

Rows = Tuple[Optional[str], ...]


class BatchProvider(Protocol):
    """A source of adapters for mixed batches outside the layers (``AdapterPool``).

    Registered on a model with :func:`fastpeft.core.batch.add_provider`;
    ``batch_adapters`` asks each one once per plan.
    """

    def served(self) -> Collection[str]:
        """Names of the adapters it can serve now."""
        ...

    def provide(self, rows: Rows) -> contextlib.AbstractContextManager:
        """A context that, while a plan is alive, keeps ``rows``'s adapters available
        and yields ``{layer module: payload}`` (what each layer reads from the plan)."""
        ...


def check_rows(x: Any, num_rows: int) -> None:
    """A mixed batch of ``num_rows`` names one adapter per row of ``x``'s first dim."""
    if x.dim() < 2 or x.shape[0] != num_rows:
        raise ValueError(
            f"batch_adapters got {num_rows} adapter names but this layer's input has "
            f"batch size {x.shape[0] if x.dim() else 'none'} (shape {tuple(x.shape)}); "
            "give one name (or None) per batch row"
        )


class BatchPlan:
    """The adapter of each batch row, what providers supply per layer, and values derived
    once per forward (see the module doc)."""

    __slots__ = ("rows", "provided", "_derived")

    def __init__(self, rows: Sequence[Optional[str]], provided: Optional[Mapping[nn.Module, Any]] = None) -> None:
        self.rows: Rows = tuple(rows)
        self.provided: Mapping[nn.Module, Any] = provided or {}
        self._derived: Dict[Hashable, Any] = {}

    def derived(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value under ``key``, made by ``make()`` the first time a layer asks."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def check_batch(self, x: Any) -> None:
        """A mixed batch names one adapter per row of ``x``'s first dim."""
        check_rows(x, len(self.rows))

    def __repr__(self) -> str:
        return f"BatchPlan(rows={list(self.rows)}, provided_layers={len(self.provided)})"


# --------------------------------------------------------------------- providers of a model

_PROVIDERS = "fastpeft_providers"


def add_provider(model: nn.Module, provider: BatchProvider) -> None:
    """Let ``batch_adapters(model, ...)`` take adapters from ``provider`` too."""
    providers = model.__dict__.setdefault(_PROVIDERS, [])
    if not any(p is provider for p in providers):
        providers.append(provider)


def remove_provider(model: nn.Module, provider: BatchProvider) -> None:
    providers = model.__dict__.get(_PROVIDERS, [])
    providers[:] = [p for p in providers if p is not provider]


def providers_of(model: nn.Module) -> Sequence[BatchProvider]:
    return tuple(model.__dict__.get(_PROVIDERS, ()))


@contextlib.contextmanager
def provided_for(model: nn.Module, rows: Rows) -> Iterator[Dict[nn.Module, Any]]:
    """``{layer: payload}`` from every provider of ``model`` that serves the rows' adapters,
    held for the block. A provider serves a batch whole or not at all: one that holds
    some of the named adapters but not all is an error (the rest would silently run
    the layers' own adapters of the same names)."""
    wanted = {n for n in rows if n is not None}
    provided: Dict[nn.Module, Any] = {}
    with contextlib.ExitStack() as stack:
        for provider in providers_of(model):
            served = wanted & set(provider.served())
            if not served:
                continue
            if served != wanted:
                raise KeyError(
                    f"a mixed batch takes its adapters from the pool or from the layers, not both: "
                    f"{sorted(wanted - served)} are not loaded in the pool ({sorted(provider.served())})"
                )
            provided.update(stack.enter_context(provider.provide(rows)))
        yield provided
