"""Reading and checking an adapter before it goes into a pool slot.

Sources are PEFT directories (read by ``fastpeft.core.checkpoint``, the one PEFT reader),
PEFT state dicts, or ``{layer: (A, B)}``; state-dict keys are read with LoRA's own key
map (``fastpeft.methods.lora.method.parse_lora_key``) and each layer's scaling follows
the LoRA config's own rank/alpha rules (``LoraConfig.rank_and_alpha``, ``lora_scaling``).
AdaLoRA adapters (``peft_type`` ADALORA) are read with the AdaLoRA package's key map and
rules and folded to LoRA pairs (``A ∘ E``, ``B``) with each layer's scale fixed.
Every check runs before any slot is written, so a bad adapter leaves the pool as it was;
the messages say what an adapter is when it is not LoRA (another PEFT method, LoRA
features the kernels do not run) rather than which key is unexpected.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from fastpeft.core.checkpoint import CONFIG_NAME, read_adapter, strip_model_prefix
from fastpeft.core.config import config_to_plain, pattern_key
from fastpeft.core.method import registered_methods
from fastpeft.methods.adalora.config import AdaLoraConfig, adalora_scale, adalora_scaling, layer_rank, pattern_paths
from fastpeft.methods.adalora.layer import fold_E
from fastpeft.methods.adalora.method import parse_adalora_key
from fastpeft.methods.lora.config import LoraConfig, lora_scaling
from fastpeft.methods.lora.method import parse_lora_key

__all__ = [
    "AdapterError", "Pair", "Source", "Staged", "read_source", "layer_scaling", "given_scaling", "check_pair",
    "check_finite",
]

Source = Union[str, os.PathLike, Mapping[str, Any]]


class AdapterError(ValueError):
    """An adapter that cannot be loaded into the pool (the pool is left unchanged)."""


@dataclass
class Pair:
    """One layer's LoRA factors as given, and the source keys they came from (for messages).
    ``scale``: set when the source fixes the layer's scale itself (an AdaLoRA adapter
    folded to LoRA, whose layers may have rank 0: pruned away)."""

    A: Any
    B: Any
    keys: Tuple[str, ...]
    scale: Optional[float] = None
    magnitude: Any = None  # DoRA's lora_magnitude_vector, when the adapter has one


@dataclass
class Staged:
    """A validated adapter, ready to be written into a slot: ``{layer: (A, B, scaling)}``
    and, for a DoRA adapter, ``{layer: column scale c}`` (``(N,)`` fp32)."""

    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]
    dora: Dict[str, torch.Tensor] = field(default_factory=dict)


def describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def keys_text(keys: Sequence[str]) -> str:
    return " / ".join(repr(k) for k in keys)


# --------------------------------------------------------------------- what an adapter is

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


def _not_lora(peft_type: str, name: str, evidence: str) -> AdapterError:
    """The error for an adapter of another PEFT method: what it is, and where it runs."""
    kind = _METHOD_NAMES.get(peft_type, f"a non-LoRA ({peft_type})")
    if peft_type == "ADALORA":  # served, folded to LoRA: its config fixes each layer's rank and scale
        return AdapterError(
            f"adapter {name!r} is an AdaLoRA adapter ({evidence}): give its AdaLoRA config (config= a fastpeft "
            "or peft AdaLoraConfig, or its adapter_config.json dict), which fixes each layer's rank and scale"
        )
    hint = ""
    if peft_type in registered_methods():
        hint = f"; fastpeft runs {kind.split(' ', 1)[1]} adapters in the model itself (fastpeft.load_adapter)"
    return AdapterError(
        f"adapter {name!r} is {kind} adapter ({evidence}), and the pool serves LoRA adapters only "
        f"(lora_A/lora_B weights){hint}"
    )


def lora_config_of(name: str, cfg: Mapping[str, Any], origin: str) -> LoraConfig:
    """The LoRA config of a config dict, or an ``AdapterError`` naming what the pool
    cannot serve: another PEFT method, or LoRA features no fastpeft LoRA layer runs
    (variants, base-rewriting inits, lora_bias)."""
    peft_type = cfg.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise _not_lora(str(peft_type).upper(), name, f"peft_type {peft_type!r} in {origin}")
    return _servable(name, LoraConfig, {**cfg, "peft_type": "LORA"}, origin,
                     ["lora_bias=True"] if cfg.get("lora_bias") else [])


def _servable(name: str, config_cls: type, cfg: Mapping[str, Any], origin: str, problems: List[str]) -> Any:
    """``config_cls.from_dict(cfg)``, or an ``AdapterError`` listing ``problems`` and what
    of the config fastpeft does not run (``unsupported()``) or cannot read."""
    config = None
    try:
        config = config_cls.from_dict(dict(cfg))
        problems = problems + config.unsupported()
    except (TypeError, ValueError) as exc:
        problems = problems + [f"an invalid config ({exc})"]
    if problems or config is None:
        raise AdapterError(f"adapter {name!r} cannot be served from the pool ({origin}): {', '.join(problems)}")
    return config


# --------------------------------------------------------------------- reading


def read_source(name: str, source: Source, config: Any) -> Tuple[Optional[Dict[str, Any]], Optional[LoraConfig], Dict[str, Pair]]:
    """``(config dict, its LoraConfig, {module path: Pair})`` of an adapter source (the
    config ones None when neither the source nor ``config`` has one); the config is
    checked before the tensors."""
    cfg = None if config is None else _config_dict(config)
    origin = "the config passed"
    if isinstance(source, (str, os.PathLike)):
        try:
            saved, tensors = read_adapter(source)
        except (ValueError, OSError) as e:  # the checkpoint readers' errors are ValueErrors
            raise AdapterError(f"cannot read adapter directory {os.fspath(source)!r}: {e}") from e
        if cfg is None:
            cfg, origin = saved, f"{CONFIG_NAME} of {os.fspath(source)!r}"
        if is_adalora(cfg):
            return cfg, None, adalora_pairs(name, cfg, tensors, origin)
        lora = lora_config_of(name, cfg, origin)
        return cfg, lora, _pairs(tensors, name, os.fspath(source))
    if not isinstance(source, Mapping):
        raise AdapterError(
            f"adapter {name!r}: source must be a PEFT directory path or a mapping of tensors, got {type(source).__name__}"
        )
    if is_adalora(cfg):
        return cfg, None, adalora_pairs(name, cfg, source, origin)
    lora = None if cfg is None else lora_config_of(name, cfg, origin)
    if source and all(isinstance(v, (tuple, list)) for v in source.values()):
        pairs = {}
        for k, v in source.items():
            if len(v) != 2:
                raise AdapterError(f"adapter {name!r}: layer {k!r} must map to (A, B), got {len(v)} items")
            pairs[str(k)] = Pair(v[0], v[1], (str(k),))
        return cfg, lora, pairs
    return cfg, lora, _pairs(source, name)


def _config_dict(config: Any) -> Dict[str, Any]:
    try:
        return config_to_plain(config)  # peft's PeftType (a str Enum) becomes its value
    except TypeError:
        raise AdapterError(
            f"config must be a LoraConfig (fastpeft or peft) or a dict, got {type(config).__name__}"
        ) from None


def _not_lora_key(key: str) -> str:
    if "lora_B" in key and key.endswith(".bias"):
        return "lora_bias (unsupported by the pool)"
    if "lora_embedding" in key:
        return "LoRA on an embedding (unsupported by the pool)"
    if ".lora_" not in key:
        return ("a trained base tensor: the pool serves LoRA A/B only, not modules_to_save or "
                "bias='all'/'lora_only' biases; load such an adapter with fastpeft.load_adapter")
    return "unsupported"


def _pairs(tensors: Mapping[str, Any], name: str, origin: str = "") -> Dict[str, Pair]:
    """``{module path: Pair}`` from the PEFT state-dict keys of one LoRA adapter: one
    ``lora_A`` and one ``lora_B`` weight per module (see :func:`_groups`); another
    method's tensors are named as such."""
    where = f"adapter {name!r}" + (f" ({origin})" if origin else "")
    for key in tensors:
        if parse_lora_key(str(key)) is None:
            for pattern, peft_type in _METHOD_TENSORS:
                if pattern.search(str(key)):
                    raise _not_lora(peft_type, name, f"its tensors include {key!r}")

    def unknown(key: str) -> str:
        return (f"{where}: tensor {key!r} is not a LoRA A/B weight ({_not_lora_key(key)}); pass only the adapter's "
                "tensors (what PEFT saves: peft.get_peft_model_state_dict), not a whole model's state dict")

    groups = _groups(tensors, where, parse_lora_key, unknown)
    return {
        path: Pair(h["A"][1], h["B"][1], (h["A"][0], h["B"][0]), magnitude=h["M"][1] if "M" in h else None)
        for path, h in _complete(groups, "AB", where)
    }


def _groups(
    tensors: Mapping[str, Any], where: str, parse: Callable[[str], Optional[Tuple[str, str, Optional[str]]]],
    unknown: Callable[[str], str], ignored: Sequence[str] = (),
) -> Dict[str, Dict[str, Tuple[str, Any]]]:
    """``{module path: {part: (key, tensor)}}`` of one adapter's state dict, read with the
    method's key map (``parse``: ``(path, part, adapter segment)`` or None; parts in
    ``ignored`` are dropped). Paths lose PEFT's ``base_model.model.`` prefix. Refused: a
    key ``parse`` does not know (``unknown`` words the message), a part given twice
    (``x.lora_A.weight`` and ``base_model.model.x.lora_A.weight``), tensors of several
    adapters (``lora_A.default.weight`` and ``lora_A.other.weight``)."""
    groups: Dict[str, Dict[str, Tuple[str, Any]]] = {}
    adapters: Dict[str, str] = {}  # adapter-name segment -> first key that has it
    for key, t in tensors.items():
        found = parse(str(key))
        if found is None:
            raise AdapterError(unknown(str(key)))
        path, part, segment = found
        if part in ignored:
            continue
        path = strip_model_prefix(path)
        seen = groups.setdefault(path, {}).get(part)
        if seen is not None:
            raise AdapterError(
                f"{where}: {seen[0]!r} and {key!r} are both the {_part(part)} weight of {path!r}, so it is "
                "ambiguous which one to serve; pass the tensors of one adapter, each once"
            )
        groups[path][part] = (str(key), t)
        if segment is not None:
            adapters.setdefault(segment, str(key))
    if len(adapters) > 1:
        (n1, k1), (n2, k2) = list(adapters.items())[:2]
        raise AdapterError(
            f"{where}: the tensors belong to several adapters ({sorted(adapters)}), e.g. {k1!r} ({n1!r}) and "
            f"{k2!r} ({n2!r}); pass one adapter's tensors (peft.get_peft_model_state_dict(model, adapter_name=...))"
        )
    return groups


def _part(part: str) -> str:
    if part == "M":
        return "lora_magnitude_vector"
    return part if part.startswith("lora_") else f"lora_{part}"


def _complete(groups: Dict[str, Dict[str, Tuple[str, Any]]], parts: Sequence[str], where: str):
    """``(path, parts)`` of each module, after checking it has every one of ``parts``."""
    for path, h in groups.items():
        missing = [p for p in parts if p not in h]
        if missing:
            have = ", ".join(f"a {_part(p)} weight ({k!r})" for p, (k, _) in h.items())
            raise AdapterError(f"{where}: layer {path!r} has {have} but no {' or '.join(map(_part, missing))} weight")
        yield path, h


# --------------------------------------------------------------------- AdaLoRA


def is_adalora(cfg: Optional[Mapping[str, Any]]) -> bool:
    return cfg is not None and str(cfg.get("peft_type") or "").upper() == "ADALORA"


def adalora_pairs(name: str, cfg: Dict[str, Any], tensors: Mapping[str, Any], origin: str) -> Dict[str, Pair]:
    """An AdaLoRA adapter as LoRA pairs of each layer's current rank: ``A' = A ∘ E``,
    ``B' = B`` and the scale ``scaling / (ranknum + 1e-5)`` fixed per layer, by the AdaLoRA
    package's own rules (config, per-layer rank from the ``rank_pattern``, key map with
    legacy ``ranknum`` keys ignored). Layers pruned to rank 0 are kept (shapes checked;
    the pool serves them as no adapter)."""
    where = f"adapter {name!r} ({origin})"
    config: AdaLoraConfig = _servable(name, AdaLoraConfig, cfg, origin, [])

    def unknown(key: str) -> str:
        return (f"{where}: tensor {key!r} is not an AdaLoRA lora_A/lora_E/lora_B tensor; pass only the adapter's "
                "tensors (what PEFT saves: peft.get_peft_model_state_dict)")

    groups = _groups(tensors, where, parse_adalora_key, unknown, ignored=("ranknum",))
    for path, mask in pattern_paths(config, name).items():
        if len(mask) != config.init_r:
            raise AdapterError(f"{where}: rank_pattern for {path!r} has {len(mask)} entries but init_r is "
                               f"{config.init_r} (one per initial triplet)")
        if strip_model_prefix(path) not in groups:
            raise AdapterError(f"{where}: rank_pattern names {path!r}, but the adapter has no weights for it: "
                               "config and weights do not belong together")
    pairs = {}
    for path, h in _complete(groups, ("lora_A", "lora_E", "lora_B"), where):
        (kA, A), (kE, E), (kB, B) = h["lora_A"], h["lora_E"], h["lora_B"]
        lwhere = f"{where}, layer {path!r}"
        for what, t in (("lora_A", A), ("lora_E", E)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
                raise AdapterError(f"{lwhere}: {what} must be a 2-D floating tensor, got {describe(t)}")
            check_finite(lwhere, what, t, t)
        r = A.shape[0]
        if tuple(E.shape) != (r, 1):
            raise AdapterError(f"{lwhere}: lora_E has shape {tuple(E.shape)} but lora_A has rank {r} (shape "
                               f"{tuple(A.shape)}); AdaLoRA needs E ({r}, 1): a damaged or mixed-up adapter")
        expected = layer_rank(config, name, path)
        if r != expected:
            raise AdapterError(
                f"{lwhere}: the tensors have rank {r} but the config gives this layer rank {expected} (init_r="
                f"{config.init_r}{', and its rank_pattern' if config.rank_pattern else ', no rank_pattern'}): config "
                "and weights do not belong together (PEFT saves the tensors pruned to the rank_pattern)"
            )
        scale = adalora_scale(adalora_scaling(r, config.lora_alpha), config.init_r)
        pairs[path] = Pair(fold_E(A.detach(), E.detach()), B, (kA, kE, kB), finite_scaling(scale, lwhere))
    return pairs


# --------------------------------------------------------------------- checks


def check_pair(
    A: Any, B: Any, in_features: int, out_features: int, max_rank: int, where: str, min_rank: int = 1
) -> int:
    """The rank of ``(A, B)`` after checking them against a layer's sizes and the pool
    (``min_rank`` 0: a layer pruned away is allowed)."""
    for what, t in (("lora_A", A), ("lora_B", B)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
            raise AdapterError(f"{where}: {what} must be a 2-D floating tensor, got {describe(t)}")
    r = A.shape[0]
    if A.shape[1] != in_features:
        raise AdapterError(
            f"{where}: lora_A has shape {tuple(A.shape)} but the layer has in_features "
            f"{in_features} (expected (r, {in_features})): adapter made for another base model?"
        )
    if B.shape[1] != r:
        raise AdapterError(
            f"{where}: lora_A has rank {r} (shape {tuple(A.shape)}) but lora_B has rank {B.shape[1]} "
            f"(shape {tuple(B.shape)}): the two factors do not belong together"
        )
    if B.shape[0] != out_features:
        raise AdapterError(
            f"{where}: lora_B has shape {tuple(B.shape)} but the layer has out_features "
            f"{out_features} (expected ({out_features}, r)): adapter made for another base model?"
        )
    if not min_rank <= r <= max_rank:
        raise AdapterError(f"{where}: rank {r} is outside {min_rank}..{max_rank} (the pool's max_rank)")
    return r


def check_finite(where: str, what: str, given: torch.Tensor, stored: torch.Tensor) -> None:
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


def layer_scaling(
    module: str, r: int, cfg: Optional[Dict[str, Any]], config: Optional[LoraConfig], lora_alpha: Optional[float],
    use_rslora: bool, where: str,
) -> float:
    """The scaling of the layer at ``module`` whose weights have rank ``r``: the config's
    rules (``rank_pattern``/``alpha_pattern``, rsLoRA) as PEFT applies them, after
    checking the config's rank for that layer; else ``lora_alpha`` given with the
    weights. A scaling that is not a finite number is refused."""
    try:
        if config is None:
            if lora_alpha is None:
                raise AdapterError(f"{where}: give config=, lora_alpha= or scaling= for in-memory weights")
            s = lora_scaling(r, float(lora_alpha), use_rslora)
        else:
            module = strip_model_prefix(module)
            expected_r, alpha = config.rank_and_alpha(module)
            # A config dict without r states no rank (unless a rank_pattern names this layer).
            if ("r" in cfg or pattern_key(config.rank_pattern, module) is not None) and expected_r != r:
                raise AdapterError(
                    f"{where}: weights have rank {r} but the config says r={expected_r}: config and "
                    "weights do not belong together"
                )
            rslora = config.use_rslora if "use_rslora" in cfg else use_rslora
            s = lora_scaling(r, float(alpha), rslora)
    except AdapterError:
        raise
    except (TypeError, ValueError) as exc:  # float() of a non-number, lora_scaling's alpha check
        raise AdapterError(f"{where}: cannot compute the scaling: {exc}") from None
    return finite_scaling(s, where)


def given_scaling(scaling: Union[float, Mapping[str, float]], lname: str, key: str, where: str) -> float:
    """The ``scaling=`` given to ``load``: one number, or one per layer (by pool layer
    name or the name in the source)."""
    if not isinstance(scaling, Mapping):
        return finite_scaling(scaling, where)
    for k in (lname, key):
        if k in scaling:
            return finite_scaling(scaling[k], where)
    raise AdapterError(f"{where}: no scaling given for this layer (scaling= has {sorted(scaling)})")


def finite_scaling(s: Any, where: str) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{where}: cannot compute the scaling: {exc}") from None
    if not math.isfinite(s):
        raise AdapterError(f"{where}: the scaling is {s} (from scaling= / lora_alpha / the config); it must be finite")
    return s
