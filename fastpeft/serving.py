"""Serving many LoRA adapters over one frozen base model.

Two pieces:

* :class:`AdapterPool`: fixed device slots for up to ``max_adapters`` adapters of rank
  ``<= max_rank``. Every target layer holds two stacks, ``A: (S, max_rank, K)`` and
  ``B: (S, N, max_rank)``, plus each slot's rank and scaling. Loading writes into a slot
  and unloading frees it; no tensor ever changes shape, so kernels, ``torch.compile``
  graphs and CUDA graphs that read the stacks stay valid across swaps. When the pool is
  full the least recently used adapter that is not pinned is evicted. Loading a bad
  adapter raises and leaves the pool exactly as it was (everything is validated before
  the first byte is written).
* :class:`ServingEngine`: batched generation over a transformers causal LM into which
  fastpeft injected ``FastLoRALinear`` layers; each request (batch row) names its own
  adapter (or None for the base model); greedy or seeded sampling; the model's own KV
  cache. The mixed-adapter layers run the fused kernel of ``fastpeft.ops_multi``.

Example::

    pool = AdapterPool(model, max_adapters=64, max_rank=16)
    pool.load("sql", "adapters/sql")                  # a PEFT-format directory
    pool.load("chat", state_dict, config=lora_config, pin=True)
    engine = ServingEngine(model, pool)
    out = engine.generate(input_ids, ["sql", None, "chat"], max_new_tokens=32)
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from fastpeft.kernels.multi_lora_meta import MultiLoraMeta
from fastpeft.checkpoint import CONFIG_NAME, read_adapter_config, read_adapter_weights
from fastpeft.config import LoraConfig, pattern_key
from fastpeft.lora import POOL_ATTR, FastLoRALinear, lora_scaling
from fastpeft.model import batch_adapters, registered_methods
from fastpeft.ops_multi import build_meta, row_slots_for_tokens

__all__ = ["AdapterPool", "AdapterError", "PoolFullError", "ServingEngine", "GenerationOutput"]


class AdapterError(ValueError):
    """An adapter that cannot be loaded into the pool (the pool is left unchanged)."""


class PoolFullError(RuntimeError):
    """Every slot holds a pinned (or in-use) adapter: nothing can be evicted."""


@dataclass
class LayerSlots:
    """The slot stacks of one target layer.

    ``lora_A[i, :r_i]`` and ``lora_B[i, :, :r_i]`` hold slot ``i``'s adapter (PEFT layout);
    ``ranks[i] = r_i`` (0: the adapter does not target this layer, or the slot is free)
    and ``scalings[i] = s_i``. ``ranks_host`` mirrors ``ranks`` on the host.
    """

    name: str
    in_features: int
    out_features: int
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    ranks_host: List[int]
    pool: "AdapterPool" = field(repr=False)


@dataclass
class _Pair:
    """One layer's LoRA factors as given, and the source keys they came from (for messages)."""

    A: Any
    B: Any
    keys: Tuple[str, ...]


@dataclass
class _Staged:
    """A validated adapter, ready to be written into a slot: ``{layer: (A, B, scaling)}``."""

    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]


Source = Union[str, os.PathLike, Mapping[str, Any]]


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
        attach: make the layers run pool adapters in mixed batches (default True).
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
        if isinstance(model, nn.Module):
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
            specs = {n: (m.in_features, m.out_features, m.weight.device, m.weight.dtype, m) for n, m in found.items()}
        else:
            if device is None or dtype is None:
                raise ValueError("a pool built from layer shapes needs device= and dtype=")
            specs = {n: (int(k), int(nn_), None, None, None) for n, (k, nn_) in model.items()}
            if not specs:
                raise ValueError("a pool needs at least one layer")
        self.layers: Dict[str, LayerSlots] = {}
        S, R = max_adapters, max_rank
        for name, (K, N, dev, dt, module) in specs.items():
            dev = torch.device(device) if device is not None else dev
            dt = dtype or dt
            slots = LayerSlots(
                name=name,
                in_features=K,
                out_features=N,
                lora_A=torch.zeros(S, R, K, device=dev, dtype=dt),
                lora_B=torch.zeros(S, N, R, device=dev, dtype=dt),
                ranks=torch.zeros(S, device=dev, dtype=torch.int32),
                scalings=torch.zeros(S, device=dev, dtype=torch.float32),
                ranks_host=[0] * S,
                pool=self,
            )
            self.layers[name] = slots
            if attach and module is not None:
                setattr(module, POOL_ATTR, slots)
        self._modules = {n: s[4] for n, s in specs.items() if s[4] is not None} if attach else {}
        self.device = next(iter(self.layers.values())).lora_A.device
        self._slot_of: Dict[str, int] = {}
        self._lru: "OrderedDict[str, None]" = OrderedDict()  # least recently used first
        self._pinned: set = set()
        self._in_use: Dict[str, int] = {}
        self._meta_cache: Dict[Tuple, MultiLoraMeta] = {}
        self._last_batch_slots: Optional[Tuple[List[int], torch.Tensor]] = None

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
          per layer).

        Each layer's scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with
        ``rank_pattern`` / ``alpha_pattern`` of the config applied per layer as PEFT does.
        Returns the slot. Raises :class:`AdapterError` (pool unchanged: slots, names, LRU
        order and pins, and no adapter evicted) for a bad adapter: shapes or ranks that do
        not fit the layers or the config, NaN/inf weights or values past the range of the
        pool's dtype (checked as the slots would hold them), tensors of several adapters or
        of one layer twice, another PEFT method ((IA)^3, bottleneck, ...) or LoRA features
        the kernels do not run (DoRA, lora_bias). Raises :class:`PoolFullError` when every
        slot is pinned or in use.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._slot_of:
            raise AdapterError(f"adapter {name!r} is already loaded (slot {self._slot_of[name]}); unload it first")
        staged = self._stage(name, source, config, lora_alpha, scaling, use_rslora)
        slot = self._free_slot(name)
        self._write(slot, staged)
        self._slot_of[name] = slot
        self._lru[name] = None
        if pin:
            self._pinned.add(name)
        self._meta_cache.clear()
        return slot

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (pinned adapters too: unloading is explicit)."""
        self._require(name)
        if self._in_use.get(name):
            raise RuntimeError(f"adapter {name!r} is in use by a running batch; unload it after the batch")
        slot = self._slot_of.pop(name)
        self._lru.pop(name, None)
        self._pinned.discard(name)
        self._clear_slot(slot)
        self._meta_cache.clear()

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

    def _clear_slot(self, slot: int) -> None:
        with torch.no_grad():
            for ls in self.layers.values():
                ls.ranks_host[slot] = 0
                ls.ranks[slot] = 0
                ls.scalings[slot] = 0.0
                ls.lora_A[slot].zero_()
                ls.lora_B[slot].zero_()

    def _write(self, slot: int, staged: _Staged) -> None:
        with torch.no_grad():
            for lname, ls in self.layers.items():
                ls.lora_A[slot].zero_()
                ls.lora_B[slot].zero_()
                if lname in staged.layers:
                    A, B, s = staged.layers[lname]
                    r = A.shape[0]
                    ls.lora_A[slot, :r].copy_(A)
                    ls.lora_B[slot, :, :r].copy_(B)
                    ls.ranks_host[slot] = r
                    ls.ranks[slot] = r
                    ls.scalings[slot] = float(s)
                else:
                    ls.ranks_host[slot] = 0
                    ls.ranks[slot] = 0
                    ls.scalings[slot] = 0.0

    # ---------------------------------------------------------------- validation

    def _stage(self, name, source, config, lora_alpha, scaling, use_rslora) -> _Staged:
        cfg: Optional[Dict[str, Any]] = None
        if isinstance(source, (str, os.PathLike)):
            cfg, tensors = read_peft_dir(source)
            origin = f"{CONFIG_NAME} of {os.fspath(source)!r}"
            if config is not None:
                cfg, origin = _config_dict(config), "the config passed"
            _check_config(name, cfg, origin)
            pairs = _pairs_from_state_dict(tensors, name, os.fspath(source))
        elif isinstance(source, Mapping):
            if config is not None:
                cfg = _config_dict(config)
                _check_config(name, cfg, "the config passed")
            if source and all(isinstance(v, (tuple, list)) for v in source.values()):
                pairs = {}
                for k, v in source.items():
                    if len(v) != 2:
                        raise AdapterError(f"adapter {name!r}: layer {k!r} must map to (A, B), got {len(v)} items")
                    pairs[str(k)] = _Pair(v[0], v[1], (str(k),))
            else:
                pairs = _pairs_from_state_dict(source, name)
        else:
            raise AdapterError(
                f"adapter {name!r}: source must be a PEFT directory path or a mapping of tensors, "
                f"got {type(source).__name__}"
            )
        if not pairs:
            raise AdapterError(f"adapter {name!r} holds no LoRA weights (no lora_A/lora_B tensors)")

        staged: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        keys_of: Dict[str, Tuple[str, ...]] = {}
        for key, pair in pairs.items():
            A, B = pair.A, pair.B
            lname = self._match_layer(key, name)
            if lname in staged:
                raise AdapterError(
                    f"adapter {name!r}: {_keys(keys_of[lname])} and {_keys(pair.keys)} both map to layer "
                    f"{lname!r}; give each layer's weights once"
                )
            keys_of[lname] = pair.keys
            ls = self.layers[lname]
            where = f"adapter {name!r}, layer {lname!r}"
            for what, t in (("lora_A", A), ("lora_B", B)):
                if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
                    raise AdapterError(f"{where}: {what} must be a 2-D floating tensor, got {_describe(t)}")
            r = A.shape[0]
            if A.shape[1] != ls.in_features:
                raise AdapterError(
                    f"{where}: lora_A has shape {tuple(A.shape)} but the layer has in_features "
                    f"{ls.in_features} (expected (r, {ls.in_features})): adapter made for another base model?"
                )
            if B.shape[1] != r:
                raise AdapterError(
                    f"{where}: lora_A has rank {r} (shape {tuple(A.shape)}) but lora_B has rank {B.shape[1]} "
                    f"(shape {tuple(B.shape)}): the two factors do not belong together"
                )
            if B.shape[0] != ls.out_features:
                raise AdapterError(
                    f"{where}: lora_B has shape {tuple(B.shape)} but the layer has out_features "
                    f"{ls.out_features} (expected ({ls.out_features}, r)): adapter made for another base model?"
                )
            if not 1 <= r <= self.max_rank:
                raise AdapterError(f"{where}: rank {r} is outside 1..{self.max_rank} (the pool's max_rank)")
            s = self._scaling(lname, key, r, cfg, lora_alpha, scaling, use_rslora, where)
            # Checked as the slots will hold them: finite fp32 values can overflow fp16/bf16 slots.
            A_slot = A.detach().to(ls.lora_A.device, ls.lora_A.dtype)
            B_slot = B.detach().to(ls.lora_B.device, ls.lora_B.dtype)
            _check_finite(where, "lora_A", A, A_slot)
            _check_finite(where, "lora_B", B, B_slot)
            staged[lname] = (A_slot, B_slot, s)
        return _Staged(staged)

    def _match_layer(self, key: str, adapter: str) -> str:
        path = _strip_model_prefix(key)
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

    @classmethod
    def _scaling(cls, lname, key, r, cfg, lora_alpha, scaling, use_rslora, where) -> float:
        try:
            s = cls._raw_scaling(lname, key, r, cfg, lora_alpha, scaling, use_rslora, where)
        except AdapterError:
            raise
        except (TypeError, ValueError) as exc:  # float() of a non-number, lora_scaling's alpha check
            raise AdapterError(f"{where}: cannot compute the scaling: {exc}") from None
        if not math.isfinite(s):
            raise AdapterError(f"{where}: the scaling is {s} (from scaling= / lora_alpha / the config); it must be finite")
        return s

    @staticmethod
    def _raw_scaling(lname, key, r, cfg, lora_alpha, scaling, use_rslora, where) -> float:
        if scaling is not None:
            if isinstance(scaling, Mapping):
                for k in (lname, key):
                    if k in scaling:
                        return float(scaling[k])
                raise AdapterError(f"{where}: no scaling given for this layer (scaling= has {sorted(scaling)})")
            return float(scaling)
        rslora = use_rslora
        if cfg is not None:
            alpha = cfg.get("lora_alpha", 8)
            rslora = bool(cfg.get("use_rslora", use_rslora))
            module = _strip_model_prefix(key)
            rank_pat = _pattern_value(cfg.get("rank_pattern") or {}, module)
            expected_r = rank_pat if rank_pat is not None else cfg.get("r")
            if expected_r is not None and int(expected_r) != r:
                raise AdapterError(
                    f"{where}: weights have rank {r} but the config says r={expected_r}: config and "
                    "weights do not belong together"
                )
            alpha_pat = _pattern_value(cfg.get("alpha_pattern") or {}, module)
            if alpha_pat is not None:
                alpha = alpha_pat
        elif lora_alpha is not None:
            alpha = lora_alpha
        else:
            raise AdapterError(f"{where}: give config=, lora_alpha= or scaling= for in-memory weights")
        return lora_scaling(r, float(alpha), rslora)

    # ---------------------------------------------------------------- batches

    def row_slots(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """``(B,)`` int32 slot per name (None: -1) on the pool's device; marks them used."""
        unknown = sorted({n for n in names if n is not None and n not in self._slot_of}, key=str)
        if unknown:
            raise KeyError(f"adapters {unknown} are not loaded in the pool; loaded: {self.adapters}")
        self.touch(names)
        slots = [-1 if n is None else self._slot_of[n] for n in names]
        return torch.tensor(slots, dtype=torch.int32, device=self.device)

    def batch_slots(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """``(B,)`` int32 slot per name (None: -1) on the pool's device, for names that are
        all loaded; the LRU order is left alone. The layers of one batch share one tensor
        (the last batch's is kept), so a batch uploads its slots once, not once per layer."""
        slots = [-1 if n is None else self._slot_of[n] for n in names]
        last = self._last_batch_slots
        if last is None or last[0] != slots:
            last = self._last_batch_slots = (slots, torch.tensor(slots, dtype=torch.int32, device=self.device))
        return last[1]

    def meta_for(self, names: Sequence[Optional[str]], x: torch.Tensor) -> MultiLoraMeta:
        """Metadata for a layer input ``x: (B, ..., K)`` whose batch rows use ``names``.

        Built once per (names, rows per batch row) and shared by every layer of the
        forward pass; the cache is cleared whenever a slot changes.
        """
        per_row = 1
        for d in x.shape[1:-1]:
            per_row *= d
        key = (tuple(names), per_row, x.device)
        meta = self._meta_cache.get(key)
        if meta is None:
            batch_slot = self.row_slots(names).to(x.device)
            meta = build_meta(row_slots_for_tokens(batch_slot, x), self.max_adapters, check=False)
            if len(self._meta_cache) > 64:
                self._meta_cache.clear()
            self._meta_cache[key] = meta
        return meta

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

    def detach(self) -> None:
        """Stop serving: the layers go back to their own adapters in mixed batches."""
        for module in self._modules.values():
            if getattr(module, POOL_ATTR, None) is not None and getattr(module, POOL_ATTR).pool is self:
                delattr(module, POOL_ATTR)
        self._modules = {}


# --------------------------------------------------------------------------- PEFT input

_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_MODEL_PREFIXES = ("base_model.model.", "base_model.")

# How other PEFT methods name adapters (peft_type) and their tensors (as saved, or with the
# adapter-name segment of an in-memory state dict), for messages that say what an adapter
# is rather than which of its tensors is not lora_A/lora_B. Matched only against keys
# that are not LoRA keys: a LoRA target may itself be a module called ``adapter_up``.
_METHOD_NAMES = {
    "IA3": "an (IA)^3", "BOTTLENECK": "a bottleneck", "ADALORA": "an AdaLoRA", "LOHA": "a LoHa",
    "LOKR": "a LoKr", "OFT": "an OFT", "BOFT": "a BOFT", "VERA": "a VeRA", "PROMPT_TUNING": "a prompt-tuning",
    "P_TUNING": "a p-tuning", "PREFIX_TUNING": "a prefix-tuning", "ADAPTION_PROMPT": "an adaption-prompt",
}
_METHOD_TENSORS = (
    (re.compile(r"\.ia3_l(\.[^.]+)?$"), "IA3"),
    (re.compile(r"\.(adapter_down\.0|adapter_up)\.(weight|bias)$"), "BOTTLENECK"),
    (re.compile(r"\.lora_E(\.[^.]+)?$"), "ADALORA"),
    (re.compile(r"\.hada_[wt][12]_[ab](\.[^.]+)?$"), "LOHA"),
    (re.compile(r"\.lokr_[wt][12](_[ab])?(\.[^.]+)?$"), "LOKR"),
    (re.compile(r"\.vera_lambda_[bd](\.[^.]+)?$"), "VERA"),
)


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _keys(keys: Sequence[str]) -> str:
    return " / ".join(repr(k) for k in keys)


def _strip_model_prefix(path: str) -> str:
    """A module path without PEFT's ``base_model.model.`` wrapper prefix."""
    for prefix in _MODEL_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def _not_lora(peft_type: str, name: str, evidence: str) -> AdapterError:
    """The error for an adapter of another PEFT method: what it is, and where it runs."""
    kind = _METHOD_NAMES.get(peft_type, f"a non-LoRA ({peft_type})")
    hint = ""
    if peft_type in registered_methods():
        hint = f"; fastpeft runs {kind.split(' ', 1)[1]} adapters in the model itself (fastpeft.load_adapter)"
    return AdapterError(
        f"adapter {name!r} is {kind} adapter ({evidence}), and the pool serves LoRA adapters only "
        f"(lora_A/lora_B weights){hint}"
    )


def _check_config(name: str, cfg: Mapping[str, Any], origin: str) -> None:
    """Refuse a config the pool cannot serve: another PEFT method, or LoRA features no
    fastpeft LoRA layer runs (DoRA, variants, base-rewriting inits, lora_bias)."""
    peft_type = cfg.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)  # a PeftType in a dict config
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise _not_lora(str(peft_type).upper(), name, f"peft_type {peft_type!r} in {origin}")
    problems = []
    if cfg.get("lora_bias"):
        problems.append("lora_bias=True")
    try:
        problems += LoraConfig.from_dict({**cfg, "peft_type": "LORA"}).unsupported()
    except (TypeError, ValueError) as exc:
        problems.append(f"an invalid config ({exc})")
    if problems:
        raise AdapterError(f"adapter {name!r} cannot be served from the pool ({origin}): {', '.join(problems)}")


def _check_finite(where: str, what: str, given: torch.Tensor, stored: torch.Tensor) -> None:
    """Refuse a factor that is not finite as the slots store it (``stored``: ``given``
    cast to the pool's dtype): NaN/inf given, or finite values past the slot dtype's
    largest value, which the cast turns into inf (then the kernels serve NaN rows).
    Values that underflow to zero are kept: they change the update by less than one
    unit in the last place of the slot dtype."""
    if bool(torch.isfinite(stored).all()):
        return
    if not bool(torch.isfinite(given).all()):
        raise AdapterError(f"{where}: {what} holds NaN or inf")
    biggest = float(given.detach().abs().max())
    raise AdapterError(
        f"{where}: {what} holds values up to {biggest:.4g} in magnitude, past the largest {stored.dtype} "
        f"({torch.finfo(stored.dtype).max:.6g}), the dtype of the pool's slots: stored there they would be inf. "
        f"Rescale the adapter (A * c with B / c is the same update) or build the pool with a wider dtype "
        f"(AdapterPool(..., dtype=torch.float32))"
    )


def _pairs_from_state_dict(tensors: Mapping[str, Any], name: str, origin: str = "") -> Dict[str, _Pair]:
    """``{module path: (A, B, their keys)}`` from the PEFT state-dict keys of one adapter.

    Paths lose PEFT's ``base_model.model.`` prefix; anything but one ``lora_A`` and one
    ``lora_B`` weight per module is an error: other methods' tensors, a module given
    twice (``x.lora_A.weight`` and ``base_model.model.x.lora_A.weight``), or tensors of
    several adapters (``lora_A.default.weight`` and ``lora_A.other.weight``).
    """
    where = f"adapter {name!r}" + (f" ({origin})" if origin else "")
    for key in tensors:
        if _LORA_KEY.match(str(key)) is None:
            for pattern, peft_type in _METHOD_TENSORS:
                if pattern.search(str(key)):
                    raise _not_lora(peft_type, name, f"its tensors include {key!r}")
    halves: Dict[str, Dict[str, Tuple[str, Any]]] = {}
    adapters: Dict[str, str] = {}  # adapter-name segment -> first key that has it
    for key, t in tensors.items():
        m = _LORA_KEY.match(str(key))
        if m is None:
            kind = "unsupported"
            if "lora_B" in key and key.endswith(".bias"):
                kind = "lora_bias (unsupported by the pool)"
            elif "lora_magnitude_vector" in key:
                kind = "DoRA magnitude (unsupported by the pool)"
            elif "lora_embedding" in key:
                kind = "LoRA on an embedding (unsupported by the pool)"
            elif ".lora_" not in key:
                kind = ("a trained base tensor: the pool serves LoRA A/B only, not modules_to_save or "
                        "bias='all'/'lora_only' biases; load such an adapter with fastpeft.load_adapter")
            raise AdapterError(
                f"{where}: tensor {key!r} is not a LoRA A/B weight ({kind}); pass only the adapter's "
                "tensors (what PEFT saves: peft.get_peft_model_state_dict), not a whole model's state dict"
            )
        path, ab = _strip_model_prefix(m.group("path")), m.group("ab")
        seen = halves.setdefault(path, {}).get(ab)
        if seen is not None:
            raise AdapterError(
                f"{where}: {seen[0]!r} and {key!r} are both the lora_{ab} weight of {path!r}, so it is "
                "ambiguous which one to serve; pass the tensors of one adapter, each once"
            )
        halves[path][ab] = (str(key), t)
        if m.group("adapter") is not None:
            adapters.setdefault(m.group("adapter"), str(key))
    if len(adapters) > 1:
        (n1, k1), (n2, k2) = list(adapters.items())[:2]
        raise AdapterError(
            f"{where}: the tensors belong to several adapters ({sorted(adapters)}), e.g. {k1!r} ({n1!r}) and "
            f"{k2!r} ({n2!r}); pass one adapter's tensors (peft.get_peft_model_state_dict(model, adapter_name=...))"
        )
    pairs = {}
    for path, h in halves.items():
        if set(h) != {"A", "B"}:
            have, missing = ("lora_A", "lora_B") if "A" in h else ("lora_B", "lora_A")
            raise AdapterError(f"{where}: layer {path!r} has a {have} weight ({next(iter(h.values()))[0]!r}) "
                               f"but no {missing} weight")
        pairs[path] = _Pair(h["A"][1], h["B"][1], (h["A"][0], h["B"][0]))
    return pairs


def _config_dict(config: Any) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        d = dict(to_dict())
        if "peft_type" in d:  # peft's PeftType is a str Enum: str() would give "PeftType.LORA"
            d["peft_type"] = getattr(d["peft_type"], "value", d["peft_type"])
        return d
    raise AdapterError(f"config must be a LoraConfig (fastpeft or peft) or a dict, got {type(config).__name__}")


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Optional[Any]:
    """PEFT's pattern rule (``fastpeft.config``'s): the value of the first key whose
    regex matches the end of the module path; None when none does."""
    key = pattern_key(patterns, module)
    return None if key is None else patterns[key]


def read_peft_dir(path: Union[str, os.PathLike]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(config dict, tensors)`` of a PEFT-format adapter directory (CPU tensors), read
    and checked by ``fastpeft.checkpoint``; any problem is an ``AdapterError``."""
    try:
        return dict(read_adapter_config(path)), dict(read_adapter_weights(path))
    except (ValueError, OSError) as e:  # the checkpoint readers' errors are ValueErrors
        raise AdapterError(f"cannot read adapter directory {os.fspath(path)!r}: {e}") from e


# --------------------------------------------------------------------------- generation


@dataclass
class GenerationOutput:
    """``sequences``: ``(B, P + T)`` left-padded prompts then the new tokens;
    ``new_tokens``: ``(B, T)`` the new tokens (``pad_token_id`` after a row's EOS);
    ``prompt_lengths``: each prompt's length without padding."""

    sequences: torch.Tensor
    new_tokens: torch.Tensor
    prompt_lengths: List[int]


def _left_pad(
    input_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
    attention_mask: Optional[torch.Tensor],
    pad_id: int,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Prompts as a left-padded ``(B, P)`` batch and its mask, from a tensor (+ mask, any
    padding side) or a list of token lists of any lengths."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = [r.tolist() for r in input_ids]
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            rows = []
            for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
                keep = [i for i, v in enumerate(m) if v]
                if keep and keep != list(range(keep[0], keep[-1] + 1)):
                    raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
                rows.append([ids[i] for i in keep])
    else:
        rows = [list(map(int, r)) for r in input_ids]
    if not rows:
        raise ValueError("generate needs at least one prompt")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    P = max(lengths)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device), lengths


def _filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of ``(B, V)`` fp32 logits (as transformers)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


class ServingEngine:
    """Batched generation, each request with its own LoRA adapter.

    Args:
        model: a transformers causal LM (``model(input_ids, attention_mask=...,
            position_ids=..., past_key_values=..., use_cache=True)`` returning ``logits``
            and ``past_key_values``) with fastpeft ``FastLoRALinear`` layers, in eval mode.
        pool: the :class:`AdapterPool` serving the adapters; None: adapter names refer to
            the adapters the layers hold themselves (``fastpeft.inject``/``load_adapter``).
        pad_token_id: default: the model config's, else the EOS token, else 0.
        eos_token_id: ``"model"`` (default): the model's generation config; None: never stop
            early; an int or a list of ints.
    """

    def __init__(
        self,
        model: nn.Module,
        pool: Optional[AdapterPool] = None,
        *,
        pad_token_id: Optional[int] = None,
        eos_token_id: Any = "model",
    ) -> None:
        self.model = model
        self.pool = pool
        self.layers = [m for m in model.modules() if isinstance(m, FastLoRALinear)]
        if not self.layers:
            raise ValueError("the model has no FastLoRALinear layers: inject LoRA first (fastpeft.inject)")
        cfg = getattr(model, "generation_config", None) or getattr(model, "config", None)
        self.eos_token_id = getattr(cfg, "eos_token_id", None) if eos_token_id == "model" else eos_token_id
        if pad_token_id is None:
            pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            eos = self.eos_token_id
            pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
        self.pad_token_id = int(pad_token_id)
        # transformers renamed ``past_key_values`` to ``cache`` (5.x); take what forward has.
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _check_names(self, names: Sequence[Optional[str]]) -> None:
        for n in names:
            if n is not None and not isinstance(n, str):
                raise TypeError(f"adapter names must be strings or None, got {n!r}")
        wanted = {n for n in names if n is not None}
        if self.pool is not None:
            unknown = sorted(n for n in wanted if n not in self.pool)
            if unknown:
                raise KeyError(f"adapters {unknown} are not loaded in the pool; loaded: {self.pool.adapters}")
        else:
            held = set().union(*(layer.r.keys() for layer in self.layers))
            unknown = sorted(wanted - held)
            if unknown:
                raise KeyError(f"adapters {unknown} are held by no layer of the model; it has {sorted(held)}")

    @contextlib.contextmanager
    def _rows(self, names: List[Optional[str]]) -> Iterator[None]:
        if self.pool is not None:
            self.pool.touch(names)
        pool_ctx = self.pool.in_use(names) if self.pool is not None else contextlib.nullcontext()
        with batch_adapters(self.model, names), pool_ctx:
            yield

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
        adapter_names: Sequence[Optional[str]],
        max_new_tokens: int,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[Union[int, Sequence[int]]] = None,
        eos_token_id: Any = "engine",
        pad_token_id: Optional[int] = None,
    ) -> GenerationOutput:
        """Generate ``max_new_tokens`` per prompt, row ``i`` with adapter ``adapter_names[i]``.

        Prompts of different lengths are left-padded (``attention_mask`` marks the real
        tokens of a padded tensor, either side); positions count real tokens only, so a
        request gives the same tokens alone or in any batch. Greedy by default; with
        ``do_sample`` the logits are divided by ``temperature``, filtered by ``top_k`` /
        ``top_p`` and sampled, each row from its own generator seeded with ``seed`` (one
        int for all rows, or one per row): a seeded request samples the same tokens
        alone or batched. Generation of a row stops at ``eos_token_id`` (default: the
        engine's; None: never) and ``pad_token_id`` fills the rest.
        """
        if self.model.training or any(layer.training for layer in self.layers):
            raise RuntimeError("ServingEngine.generate runs the model in eval mode: call model.eval() first")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        eos = self.eos_token_id if eos_token_id == "engine" else eos_token_id
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        device = next(self.model.parameters()).device
        ids, mask, lengths = _left_pad(input_ids, attention_mask, pad, device)
        B = ids.shape[0]
        names = list(adapter_names)
        if len(names) != B:
            raise ValueError(f"got {B} prompts but {len(names)} adapter names; give one name (or None) per prompt")
        self._check_names(names)

        gens: Optional[List[torch.Generator]] = None
        if do_sample and seed is not None:
            seeds = [int(seed)] * B if isinstance(seed, int) else [int(s) for s in seed]
            if len(seeds) != B:
                raise ValueError(f"seed must be one int or one per prompt ({B}), got {len(seeds)}")
            gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

        new = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        with self._rows(names):
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            past = None
            step_ids, step_pos = ids, pos
            for t in range(max_new_tokens):
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=step_pos,
                    use_cache=True,
                    **{self._cache_kw: past},
                )
                past = getattr(out, self._cache_kw, None)
                if past is None:
                    past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                if do_sample:
                    logits = _filter_logits(logits / temperature, top_k, top_p)
                    probs = logits.softmax(-1)
                    if gens is None:
                        tok = torch.multinomial(probs, 1).squeeze(1)
                    else:
                        tok = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
                else:
                    tok = logits.argmax(-1)
                tok = torch.where(done, torch.full_like(tok, pad), tok)
                new[:, t] = tok
                if eos_t is not None:
                    done = done | torch.isin(tok, eos_t)
                    if bool(done.all()):
                        break
                step_ids = tok[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return GenerationOutput(sequences=torch.cat([ids, new], dim=1), new_tokens=new, prompt_lengths=lengths)
