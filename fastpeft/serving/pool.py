"""``AdapterPool``: fixed device slots for many LoRA adapters served over one base model.

Every target layer holds two stacks, ``A: (S, max_rank, K)`` and ``B: (S, N,
max_rank)``, plus each slot's rank and scaling. Loading writes into a slot and unloading
frees it; no tensor ever changes shape, so kernels, ``torch.compile`` graphs and CUDA
graphs that read the stacks stay valid across swaps. When the pool is full the least
recently used adapter that is not pinned is evicted. Loading a bad adapter raises and
leaves the pool exactly as it was (``fastpeft.serving.staging`` validates everything
before the first byte is written).

The pool is a batch provider (``fastpeft.core.batch``): attached to a model, it serves
``fastpeft.batch_adapters`` (and the engine) by putting its slot stacks for each layer
into the batch plan; the layers never call it.

Example::

    pool = AdapterPool(model, max_adapters=64, max_rank=16)
    pool.load("sql", "adapters/sql")                  # a PEFT-format directory
    pool.load("chat", state_dict, config=lora_config, pin=True)
    with fastpeft.batch_adapters(model, ["sql", None, "chat"]):
        logits = model(input_ids).logits
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastpeft.core.batch import add_provider, remove_provider
from fastpeft.core.checkpoint import strip_model_prefix
from fastpeft.kernels.multi_lora_meta import MultiLoraMeta
from fastpeft.methods.lora.layer import FastLoRALinear
from fastpeft.methods.lora.multi_op import build_meta, row_slots_for_tokens
from fastpeft.methods.lora.stacks import SlotRows, SlotStacks
from fastpeft.serving.dora_staging import check_dora_config, magnitude_scale
from fastpeft.serving.staging import (
    AdapterError,
    Source,
    Staged,
    check_finite,
    check_pair,
    given_scaling,
    keys_text,
    layer_scaling,
    read_source,
)

__all__ = ["AdapterPool", "AdapterError", "PoolFullError", "LayerSlots"]


class PoolFullError(RuntimeError):
    """Every slot holds a pinned (or in-use) adapter: nothing can be evicted."""


@dataclass
class LayerSlots:
    """The slot stacks of one target layer.

    ``lora_A[i, :r_i]`` and ``lora_B[i, :, :r_i]`` hold slot ``i``'s adapter (PEFT layout);
    ``ranks[i] = r_i`` (0: the adapter does not target this layer, or the slot is free)
    and ``scalings[i] = s_i``; ``mag[i]``: a DoRA adapter's column scale
    ``m / ||W + s B A||`` (ones for LoRA; the last row, ones, for rows with no adapter).
    """

    name: str
    in_features: int
    out_features: int
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    mag: Optional[torch.Tensor] = None


def _layer_specs(model, layers, device, dtype) -> Dict[str, Tuple[int, int, Any, Any, Optional[nn.Module]]]:
    """``{name: (K, N, device, dtype, module or None)}`` of the layers a pool serves."""
    if not isinstance(model, nn.Module):
        if device is None or dtype is None:
            raise ValueError("a pool built from layer shapes needs device= and dtype=")
        specs = {n: (int(k), int(n_), torch.device(device), dtype, None) for n, (k, n_) in model.items()}
        if not specs:
            raise ValueError("a pool needs at least one layer")
        return specs
    found = {n: m for n, m in model.named_modules() if isinstance(m, FastLoRALinear)}
    if layers is not None:
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"layers {missing} are not FastLoRALinear layers of the model; it has {sorted(found)}")
        found = {n: found[n] for n in layers}
    if not found:
        raise ValueError(
            "the model has no FastLoRALinear layers: inject LoRA first (fastpeft.inject), "
            "then build the pool over the injected model"
        )
    return {
        n: (m.in_features, m.out_features, torch.device(device) if device is not None else m.weight.device,
            dtype or m.weight.dtype, m)
        for n, m in found.items()
    }


class AdapterPool:
    """Fixed device slots for LoRA adapters served over one base model.

    Args:
        model: a module holding ``FastLoRALinear`` layers (the pool serves each of them,
            or those named in ``layers``); or a mapping ``{layer name: (in_features,
            out_features)}`` for a pool not tied to a model (then give device and dtype).
        max_adapters: number of slots ``S``.
        max_rank: largest rank an adapter may have; the stacks are padded to it, but the
            kernels never read or multiply past each slot's own rank.
        layers: restrict the pool to these layer names (default: every FastLoRALinear).
        device, dtype: of the stacks (default: each layer's base weight's).
        attach: serve the model's mixed batches (``fastpeft.batch_adapters``) from the
            pool (default True).
    """

    def __init__(
        self,
        model: Union[nn.Module, Mapping[str, Tuple[int, int]]],
        max_adapters: int,
        max_rank: int,
        *,
        layers: Optional[Sequence[str]] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        attach: bool = True,
    ) -> None:
        for what, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{what} must be a positive integer, got {v!r}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        specs = _layer_specs(model, layers, device, dtype)
        S, R = max_adapters, max_rank
        self.layers: Dict[str, LayerSlots] = {
            name: LayerSlots(
                name=name, in_features=K, out_features=N,
                lora_A=torch.zeros(S, R, K, device=dev, dtype=dt), lora_B=torch.zeros(S, N, R, device=dev, dtype=dt),
                ranks=torch.zeros(S, device=dev, dtype=torch.int32), scalings=torch.zeros(S, device=dev, dtype=torch.float32),
                mag=torch.ones(S + 1, N, device=dev, dtype=torch.float32),
            )
            for name, (K, N, dev, dt, _) in specs.items()
        }
        self._bases = {n: s[4] for n, s in specs.items()}  # the layers (None for a pool over shapes)
        self._dora: set = set()  # loaded DoRA adapters: the mixed kernel then applies ``mag``
        self._modules: Dict[str, nn.Module] = {}
        self._model: Optional[nn.Module] = None
        if attach and isinstance(model, nn.Module):
            self._modules = {n: s[4] for n, s in specs.items()}
            self._model = model
            add_provider(model, self)
        self.device = next(iter(self.layers.values())).lora_A.device
        self._slot_of: Dict[str, int] = {}
        self._lru: "OrderedDict[str, None]" = OrderedDict()  # least recently used first
        self._pinned: set = set()
        self._in_use: Dict[str, int] = {}

    # ---------------------------------------------------------------- queries

    @property
    def adapters(self) -> List[str]:
        """Loaded adapter names, least recently used first."""
        return list(self._lru)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot_of(self, name: str) -> int:
        self._require(name)
        return self._slot_of[name]

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    def _require(self, name: str) -> None:
        if name not in self._slot_of:
            raise KeyError(f"adapter {name!r} is not loaded in the pool; loaded: {self.adapters}")

    def __repr__(self) -> str:
        return (
            f"AdapterPool(max_adapters={self.max_adapters}, max_rank={self.max_rank}, layers={len(self.layers)}, "
            f"loaded={self.adapters}, pinned={sorted(self._pinned)})"
        )

    # ---------------------------------------------------------------- load / unload

    def load(
        self,
        name: str,
        source: Source,
        *,
        config: Optional[Any] = None,
        lora_alpha: Optional[float] = None,
        scaling: Optional[Union[float, Mapping[str, float]]] = None,
        use_rslora: bool = False,
        pin: bool = False,
    ) -> int:
        """Load adapter ``name`` into a slot (evicting the LRU unpinned one when full).

        ``source`` is one of:

        * a PEFT-format directory (``adapter_config.json`` + ``adapter_model.safetensors``
          or ``adapter_model.bin``);
        * a PEFT state dict ``{"...<layer>.lora_A.weight": A, "...lora_B.weight": B}``
          (keys with or without ``base_model.model.`` and an adapter-name segment), with
          ``config`` (a fastpeft/peft ``LoraConfig`` or its dict) or ``lora_alpha``;
        * ``{layer name: (A, B)}`` with ``lora_alpha`` or ``scaling`` (one float, or one
          per layer);
        * a DoRA adapter (``use_dora=True``, ``lora_magnitude_vector`` keys) in any of the
          PEFT forms above: each layer's column scale ``m / ||W + s B A||`` is computed
          from the layer's base weight at load and applied in the mixed kernel's epilogue;
        * an AdaLoRA adapter: a PEFT AdaLoRA directory, or its state dict (``lora_A``,
          ``lora_E``, ``lora_B``) with ``config`` (a fastpeft/peft ``AdaLoraConfig`` or its
          dict). It is served as a LoRA adapter of each layer's current rank: ``A ∘ E``
          and ``B``, scale ``scaling / (ranknum + 1e-5)`` as the AdaLoRA layer computes it
          (``rank_pattern`` ranks; layers pruned to rank 0 get no adapter).

        Each layer's scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with
        ``rank_pattern`` / ``alpha_pattern`` of the config applied per layer as PEFT does.
        Returns the slot. Raises :class:`AdapterError` (pool unchanged: slots, names, LRU
        order and pins, and no adapter evicted) for a bad adapter: shapes or ranks that do
        not fit the layers or the config, NaN/inf weights or values past the range of the
        pool's dtype (checked as the slots would hold them), tensors of several adapters or
        of one layer twice, another PEFT method ((IA)^3, bottleneck, ...) or LoRA features
        the kernels do not run (lora_bias), an AdaLoRA ``lora_E`` that does not fit.
        Raises :class:`PoolFullError` when every slot is pinned or in use.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._slot_of:
            raise AdapterError(f"adapter {name!r} is already loaded (slot {self._slot_of[name]}); unload it first")
        staged = self._stage(name, source, config, lora_alpha, scaling, use_rslora)
        slot = self._free_slot(name)
        self._write(slot, staged)
        if staged.dora:
            self._dora.add(name)
        self._slot_of[name] = slot
        self._lru[name] = None
        if pin:
            self._pinned.add(name)
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (pinned adapters too: unloading is explicit)."""
        self._require(name)
        if self._in_use.get(name):
            raise RuntimeError(f"adapter {name!r} is in use by a running batch; unload it after the batch")
        slot = self._slot_of.pop(name)
        self._lru.pop(name, None)
        self._pinned.discard(name)
        self._dora.discard(name)
        self._write(slot, Staged({}))

    def pin(self, name: str) -> None:
        """Never evict ``name`` (it can still be unloaded explicitly)."""
        self._require(name)
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._require(name)
        self._pinned.discard(name)

    def touch(self, names: Sequence[Optional[str]]) -> None:
        """Mark adapters as just used (most recently used last in the LRU order)."""
        for n in names:
            if n is not None and n in self._lru:
                self._lru.move_to_end(n)

    def _free_slot(self, incoming: str) -> int:
        used = set(self._slot_of.values())
        for slot in range(self.max_adapters):
            if slot not in used:
                return slot
        for victim in self._lru:  # least recently used first
            if victim not in self._pinned and not self._in_use.get(victim):
                slot = self._slot_of[victim]
                self.unload(victim)
                return slot
        raise PoolFullError(
            f"cannot load {incoming!r}: all {self.max_adapters} slots hold pinned or in-use adapters "
            f"({self.adapters}); unpin or unload one, or build a larger pool"
        )

    def _write(self, slot: int, staged: Staged) -> None:
        """Write a staged adapter into ``slot`` (the layers it does not target get rank 0;
        an empty ``Staged`` clears the slot)."""
        with torch.no_grad():
            for lname, ls in self.layers.items():
                ls.lora_A[slot].zero_()
                ls.lora_B[slot].zero_()
                r, s = 0, 0.0
                if lname in staged.layers:
                    A, B, s = staged.layers[lname]
                    r = A.shape[0]
                    ls.lora_A[slot, :r].copy_(A)
                    ls.lora_B[slot, :, :r].copy_(B)
                ls.ranks[slot] = r
                ls.scalings[slot] = float(s)
                ls.mag[slot].fill_(1.0)
                if lname in staged.dora:
                    ls.mag[slot].copy_(staged.dora[lname])

    # ---------------------------------------------------------------- validation

    def _stage(self, name, source, config, lora_alpha, scaling, use_rslora) -> Staged:
        cfg, lora_config, pairs = read_source(name, source, config)
        if not pairs:
            raise AdapterError(f"adapter {name!r} holds no LoRA weights (no lora_A/lora_B tensors)")
        fixed = any(pair.scale is not None for pair in pairs.values())  # AdaLoRA: scales from its config
        if fixed and (scaling is not None or lora_alpha is not None or use_rslora):
            raise AdapterError(
                f"adapter {name!r} is an AdaLoRA adapter: its config fixes each layer's scale "
                "(scaling / (ranknum + 1e-5)); do not pass scaling=, lora_alpha= or use_rslora="
            )
        staged: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        dora: Dict[str, torch.Tensor] = {}
        keys_of: Dict[str, Tuple[str, ...]] = {}
        for key, pair in pairs.items():
            lname = self._match_layer(key, name)
            if lname in keys_of:
                raise AdapterError(
                    f"adapter {name!r}: {keys_text(keys_of[lname])} and {keys_text(pair.keys)} both map to layer "
                    f"{lname!r}; give each layer's weights once"
                )
            keys_of[lname] = pair.keys
            ls = self.layers[lname]
            where = f"adapter {name!r}, layer {lname!r}"
            r = check_pair(pair.A, pair.B, ls.in_features, ls.out_features, self.max_rank, where,
                           min_rank=0 if fixed else 1)
            if r == 0:  # an AdaLoRA layer pruned away: no adapter there (the slot's rank stays 0)
                continue
            if fixed:
                s = pair.scale
            elif scaling is not None:
                s = given_scaling(scaling, lname, key, where)
            else:
                s = layer_scaling(key, r, cfg, lora_config, lora_alpha, use_rslora, where)
            # Checked as the slots will hold them: finite fp32 values can overflow fp16/bf16 slots.
            A_slot = pair.A.detach().to(ls.lora_A.device, ls.lora_A.dtype)
            B_slot = pair.B.detach().to(ls.lora_B.device, ls.lora_B.dtype)
            check_finite(where, "lora_A ∘ lora_E" if fixed else "lora_A", pair.A, A_slot)
            check_finite(where, "lora_B", pair.B, B_slot)
            staged[lname] = (A_slot, B_slot, s)
            check_dora_config(name, None if lora_config is None else lora_config.use_dora,
                              pair.magnitude is not None, key, AdapterError)
            if pair.magnitude is not None:
                dora[lname] = magnitude_scale(where, pair.magnitude, A_slot, B_slot, s, self._bases[lname],
                                              AdapterError)
        return Staged(staged, dora)

    def _match_layer(self, key: str, adapter: str) -> str:
        """The pool layer that a checkpoint's module path names (equal, or one path ends
        with the other)."""
        path = strip_model_prefix(key)
        if path in self.layers:
            return path
        hits = [n for n in self.layers if n.endswith("." + path) or path.endswith("." + n)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            sample = sorted(self.layers)[:6]
            raise AdapterError(
                f"adapter {adapter!r}: weights for {key!r} match no layer of the pool (layers: {sample}"
                f"{' ...' if len(self.layers) > 6 else ''}); adapter made for another model or target set?"
            )
        raise AdapterError(f"adapter {adapter!r}: {key!r} matches several pool layers {hits}; use full layer names")

    # ---------------------------------------------------------------- batches

    def _slots(self, names: Sequence[Optional[str]]) -> List[int]:
        unknown = sorted({n for n in names if n is not None and n not in self._slot_of}, key=str)
        if unknown:
            raise KeyError(f"adapters {unknown} are not loaded in the pool; loaded: {self.adapters}")
        self.touch(names)
        return [-1 if n is None else self._slot_of[n] for n in names]

    def row_slots(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """``(B,)`` int32 slot per name (None: -1) on the pool's device; marks them used."""
        return torch.tensor(self._slots(names), dtype=torch.int32, device=self.device)

    def meta_for(self, names: Sequence[Optional[str]], x: torch.Tensor) -> MultiLoraMeta:
        """Metadata for a layer input ``x: (B, ..., K)`` whose batch rows use ``names``,
        for callers that drive ``multi_lora_linear`` over the stacks themselves (build it
        once per batch and share it across layers)."""
        return build_meta(row_slots_for_tokens(self.row_slots(names).to(x.device), x), self.max_adapters, check=False)

    @contextlib.contextmanager
    def in_use(self, names: Sequence[Optional[str]]) -> Iterator[None]:
        """Adapters of a running batch: neither evicted nor unloaded until it ends."""
        used = [n for n in names if n is not None]
        for n in used:
            self._in_use[n] = self._in_use.get(n, 0) + 1
        try:
            yield
        finally:
            for n in used:
                self._in_use[n] -= 1
                if not self._in_use[n]:
                    del self._in_use[n]

    # The batch-provider protocol (fastpeft.core.batch.BatchProvider).

    def served(self) -> List[str]:
        return self.adapters

    @contextlib.contextmanager
    def provide(self, rows: Sequence[Optional[str]]) -> Iterator[Dict[nn.Module, SlotRows]]:
        """The slot stacks of every attached layer for a batch whose rows use ``rows``
        (marked used once: the LRU follows use), held in use while the plan lives."""
        slots = self._slots(rows)
        batch_slot = torch.tensor(slots, dtype=torch.int32, device=self.device)
        key = ("pool", id(self), tuple(slots), self.max_adapters)
        with self.in_use(rows):
            yield {module: self._stacks(self.layers[name], batch_slot, key, bool(self._dora))
                   for name, module in self._modules.items()}

    @staticmethod
    def _stacks(ls: LayerSlots, batch_slot: torch.Tensor, key: Any, dora: bool = False) -> SlotRows:
        stacks = SlotStacks(lora_A=ls.lora_A, lora_B=ls.lora_B, ranks=ls.ranks, scalings=ls.scalings,
                            mag_table=ls.mag if dora else None)
        return SlotRows(stacks=stacks, batch_slot=batch_slot, key=key)

    def detach(self) -> None:
        """Stop serving: the model's mixed batches go back to the layers' own adapters."""
        if self._model is not None:
            remove_provider(self._model, self)
        self._modules, self._model = {}, None
