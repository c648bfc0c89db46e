"""Reading and checking an adapter before it goes into a pool slot.

Sources are PEFT directories (read by ``fastpeft.core.checkpoint``, the one PEFT reader),
PEFT state dicts, or ``{layer: (A, B)}``; the keys are LoRA's key map read backwards
(``fastpeft.methods.lora.method.lora_pairs``) and each layer's scaling follows the LoRA
config's own rank/alpha rules (``LoraConfig.rank_and_alpha``, ``lora_scaling``). Every
check runs before any slot is written, so a bad adapter leaves the pool as it was.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from fastpeft.core.checkpoint import read_adapter, strip_prefix
from fastpeft.core.config import config_to_plain, pattern_key
from fastpeft.methods.lora.config import LoraConfig, lora_scaling
from fastpeft.methods.lora.method import lora_pairs

__all__ = ["AdapterError", "Source", "Staged", "read_source", "lora_config_of", "layer_scaling"]

Source = Union[str, os.PathLike, Mapping[str, Any]]


class AdapterError(ValueError):
    """An adapter that cannot be loaded into the pool (the pool is left unchanged)."""


@dataclass
class Staged:
    """A validated adapter, ready to be written into a slot: ``{layer: (A, B, scaling)}``."""

    layers: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def read_source(name: str, source: Source, config: Any) -> Tuple[Optional[Dict[str, Any]], Dict[str, Tuple[Any, Any]]]:
    """``(config dict or None, {module path: (A, B)})`` of an adapter source."""
    where = f"adapter {name!r}"
    cfg = None if config is None else _config_dict(config)
    try:
        if isinstance(source, (str, os.PathLike)):
            where = f"adapter {name!r} ({os.fspath(source)})"
            try:
                saved, tensors = read_adapter(source)
            except (ValueError, OSError) as e:  # the checkpoint readers' errors are ValueErrors
                raise AdapterError(f"cannot read adapter directory {os.fspath(source)!r}: {e}") from e
            return (cfg if cfg is not None else saved), lora_pairs(tensors, where)
        if not isinstance(source, Mapping):
            raise AdapterError(
                f"adapter {name!r}: source must be a PEFT directory path or a mapping of tensors, "
                f"got {type(source).__name__}"
            )
        if source and all(isinstance(v, (tuple, list)) for v in source.values()):
            for k, v in source.items():
                if len(v) != 2:
                    raise AdapterError(f"adapter {name!r}: layer {k!r} must map to (A, B), got {len(v)} items")
            return cfg, {str(k): (v[0], v[1]) for k, v in source.items()}
        return cfg, lora_pairs(strip_prefix(source, where, strict=False), where)
    except AdapterError:
        raise
    except ValueError as e:  # lora_pairs' AdapterCheckpointError
        raise AdapterError(str(e)) from e


def _config_dict(config: Any) -> Dict[str, Any]:
    try:
        return config_to_plain(config)
    except TypeError:
        raise AdapterError(
            f"config must be a LoraConfig (fastpeft or peft) or a dict, got {type(config).__name__}"
        ) from None


def lora_config_of(name: str, cfg: Dict[str, Any]) -> LoraConfig:
    """The LoRA config of a config dict, or an ``AdapterError`` naming what the pool
    cannot serve (another method, lora_bias, and what no LoRA layer runs: DoRA,
    variants, base-rewriting inits)."""
    problems: List[str] = []
    peft_type = cfg.get("peft_type")
    config = None
    if peft_type not in (None, "LORA"):
        problems.append(f"peft_type {peft_type!r} (the pool serves LoRA adapters)")
    if cfg.get("lora_bias"):
        problems.append("lora_bias=True")
    if peft_type in (None, "LORA"):
        try:
            config = LoraConfig.from_dict({**cfg, "peft_type": "LORA"})
            problems += config.unsupported()
        except (TypeError, ValueError) as exc:
            problems.append(f"an invalid config ({exc})")
    if problems or config is None:
        raise AdapterError(f"adapter {name!r} cannot be served from the pool: {', '.join(problems)}")
    return config


def layer_scaling(
    module: str, r: int, cfg: Optional[Dict[str, Any]], config: Optional[LoraConfig], lora_alpha: Optional[float],
    use_rslora: bool, where: str,
) -> float:
    """The scaling of the layer at ``module`` whose weights have rank ``r``: the config's
    rules (``rank_pattern``/``alpha_pattern``, rsLoRA) as PEFT applies them, after
    checking the config's rank for that layer; else ``lora_alpha`` given with the weights."""
    if config is None:
        if lora_alpha is None:
            raise AdapterError(f"{where}: give config=, lora_alpha= or scaling= for in-memory weights")
        return lora_scaling(r, float(lora_alpha), use_rslora)
    expected_r, alpha = config.rank_and_alpha(module)
    # A config dict without r states no rank (unless a rank_pattern names this layer).
    if ("r" in cfg or pattern_key(config.rank_pattern, module) is not None) and expected_r != r:
        raise AdapterError(
            f"{where}: weights have rank {r} but the config says r={expected_r}: config and "
            "weights do not belong together"
        )
    rslora = config.use_rslora if "use_rslora" in cfg else use_rslora
    return lora_scaling(r, float(alpha), rslora)


def check_pair(A: Any, B: Any, in_features: int, out_features: int, max_rank: int, where: str) -> int:
    """The rank of ``(A, B)`` after checking them against a layer's sizes and the pool."""
    for what, t in (("lora_A", A), ("lora_B", B)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 2:
            raise AdapterError(f"{where}: {what} must be a 2-D floating tensor, got {_describe(t)}")
    r = A.shape[0]
    if A.shape[1] != in_features:
        raise AdapterError(
            f"{where}: lora_A has shape {tuple(A.shape)} but the layer has in_features "
            f"{in_features} (expected (r, {in_features})): adapter made for another base model?"
        )
    if B.shape != (out_features, r):
        raise AdapterError(
            f"{where}: lora_B has shape {tuple(B.shape)}, expected ({out_features}, {r}) to match lora_A {tuple(A.shape)}"
        )
    if not 1 <= r <= max_rank:
        raise AdapterError(f"{where}: rank {r} is outside 1..{max_rank} (the pool's max_rank)")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise AdapterError(f"{where}: weights hold NaN or inf")
    return r
