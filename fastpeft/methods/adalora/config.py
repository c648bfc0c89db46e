"""AdaLoRA's config: PEFT's ``AdaLoraConfig`` fields, defaults, checks and JSON form.

``rank_pattern`` is AdaLoRA's own (not LoRA's ``{regex: rank}``): ``{"<module
path>.lora_E": [bool] * init_r}``, which singular triplets of each layer survive the
rank allocation (PEFT writes the keys without the adapter name; during training PEFT
keeps ``.lora_E.<adapter>`` keys, which are accepted too).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Union

from fastpeft.core.config import AdapterConfig

__all__ = [
    "AdaLoraConfig", "adalora_scaling", "adalora_scale", "layer_rank", "pattern_paths", "pattern_path",
    "pattern_mask", "RANKNUM_EPS",
]

RANKNUM_EPS = 1e-5  # PEFT's ``ranknum + 1e-5``


def adalora_scaling(r: int, lora_alpha: float) -> float:
    """PEFT's ``scaling``: ``lora_alpha``, or the layer's rank when ``lora_alpha <= 0``
    (the forward divides it by ``ranknum + 1e-5``)."""
    return lora_alpha if lora_alpha > 0 else float(r)


def adalora_scale(scaling: float, ranknum: float) -> float:
    """The factor of a layer's low-rank term: ``scaling / (ranknum + 1e-5)`` (``ranknum``
    is ``init_r``, kept through pruning as PEFT keeps it)."""
    return scaling / (float(ranknum) + RANKNUM_EPS)


@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA: PEFT 0.21's ``AdaLoraConfig`` (a ``LoraConfig`` subclass) fields and defaults.

    ``init_r``: each layer's initial rank; ``target_r``: the average rank left after
    allocation (budget ``target_r * n_layers``); ``tinit`` / ``tfinal``: warm-up and final
    steps without budget changes; ``deltaT``: steps between two maskings; ``beta1`` /
    ``beta2``: EMA factors of the sensitivity and its uncertainty; ``orth_reg_weight``:
    the orthogonal regulariser's weight; ``total_step``: the training length (required,
    as PEFT); ``rank_pattern``: the allocation result (see the module docstring).
    ``r`` is not used (as PEFT); LoRA's other fields are kept and written back.
    """

    peft_type: ClassVar[str] = "ADALORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: Union[bool, str] = True
    use_dora: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[Dict[str, List[bool]]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA (use_dora=True), as in PEFT")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0 (as PEFT)")
        for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        if self.deltaT <= 0:
            raise ValueError(f"deltaT must be a positive integer, got {self.deltaT!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight should be >= 0, got {self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                "The supplied schedule values don't allow for a budgeting phase (tinit >= total_step - tfinal): "
                "decrease tfinal/tinit or increase total_step"
            )
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, numbers.Real):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        self.rank_pattern = _checked_pattern(self.rank_pattern)

    def unsupported(self) -> List[str]:
        """Features of this config fastpeft cannot run (empty when all is supported)."""
        problems = []
        if self.bias != "none":
            problems.append(f"bias={self.bias!r} is not supported for AdaLoRA; use bias='none'")
        if self.init_lora_weights not in (True, False):
            problems.append(f"init_lora_weights={self.init_lora_weights!r}: AdaLoRA takes True or False")
        for key in ("target_parameters", "layer_replication", "trainable_token_indices", "loftq_config"):
            if self.extra.get(key):
                problems.append(f"{key}={self.extra[key]!r} is not supported")
        return problems


def _checked_pattern(pattern: Optional[Dict[str, List[bool]]]) -> Optional[Dict[str, List[bool]]]:
    """``rank_pattern`` as ``{key: [bool, ...]}``; a clear error for anything else (a
    LoRA-style ``{regex: rank}`` included)."""
    if pattern is None:
        return None
    if not isinstance(pattern, dict):
        raise ValueError(f"rank_pattern must be a dict {{'<module>.lora_E': [bool, ...]}}, got {type(pattern).__name__}")
    out: Dict[str, List[bool]] = {}
    for key, mask in pattern.items():
        if hasattr(mask, "tolist"):
            mask = mask.view(-1).tolist()
        if not isinstance(mask, (list, tuple)) or not all(isinstance(m, (bool, int)) and m in (0, 1) for m in mask):
            raise ValueError(
                f"rank_pattern[{key!r}] must be a list of booleans (which of the init_r triplets are kept), "
                f"got {mask!r}; AdaLoRA's rank_pattern is not LoRA's {{regex: rank}}"
            )
        out[str(key)] = [bool(m) for m in mask]
    return out


def pattern_paths(config: AdaLoraConfig, adapter_name: str) -> Dict[str, List[bool]]:
    """``{module path: mask}`` of the config's ``rank_pattern``: a key is
    ``<path>.lora_E`` (as PEFT saves it) or ``<path>.lora_E.<adapter>`` (as PEFT keeps it
    while training, whatever the adapter was called then)."""
    out: Dict[str, List[bool]] = {}
    for key, mask in (config.rank_pattern or {}).items():
        out[pattern_path(key, adapter_name)] = mask
    return out


def pattern_path(key: str, adapter_name: str) -> str:
    """The module path a ``rank_pattern`` key names."""
    if key.endswith(".lora_E"):
        return key[: -len(".lora_E")]
    if ".lora_E." in key:
        return key.rsplit(".lora_E.", 1)[0]
    # PEFT's own rule for other spellings: drop the adapter name, then the last part.
    if key.endswith(f".{adapter_name}"):
        key = key[: -len(adapter_name) - 1]
    return key.rpartition(".")[0]


def pattern_mask(config: AdaLoraConfig, adapter_name: str, path: str) -> Optional[List[bool]]:
    return pattern_paths(config, adapter_name).get(path)


def layer_rank(config: AdaLoraConfig, adapter_name: str, path: str) -> int:
    """The rank of the layer at ``path``: its ``rank_pattern`` entry's kept triplets, or
    ``init_r`` (the rank a saved checkpoint's tensors have there)."""
    mask = pattern_mask(config, adapter_name, path)
    return config.init_r if mask is None else sum(mask)
