"""Adapter configs that read and write ``adapter_config.json`` as Hugging Face PEFT does.

``AdapterConfig`` holds the fields every injected method shares (which modules to
target, which to train in full); a method subclasses it with its own fields and a
``peft_type``. ``to_dict()`` gives the JSON PEFT writes, ``from_dict()`` reads it back:
fields this version does not know (from newer PEFT releases) are kept in ``extra`` and
written out again, never fatal.
"""
from __future__ import annotations

import dataclasses
import enum
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Union

__all__ = ["AdapterConfig", "LoraConfig", "config_to_plain", "LORA_INIT_CHOICES"]

TargetSpec = Optional[Union[List[str], str]]

# Values of PEFT's ``init_lora_weights`` that fastpeft can initialise itself. Other PEFT
# values that touch only the adapter ("eva", "orthogonal", "mica") matter only when a new
# adapter is made: a saved adapter with them loads (its weights replace the initial
# ones). Those that rewrite the base weights are refused (BASE_REWRITING_INITS).
LORA_INIT_CHOICES = (True, False, "gaussian")

# PEFT inits that also rewrite the base weights (W <- W - s B0 A0, from an SVD, QR or
# quantisation of W), and do so again whenever PEFT loads such an adapter: its outputs
# hold only on the rewritten base, which fastpeft does not make. PEFT converts them to
# plain LoRA adapters (save_pretrained(path_initial_model_for_weight_conversion=...)).
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a config value: enums to their value, sets/tuples to lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    return value


def config_to_plain(config: Any) -> Dict[str, Any]:
    """``config.to_dict()`` of a fastpeft or ``peft`` config (or a dict) as plain JSON values."""
    if isinstance(config, dict):
        return _plain(dict(config))
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise TypeError(
            f"expected a fastpeft or peft config (an object with to_dict()), got {type(config).__name__}"
        )
    return _plain(dict(to_dict()))


@dataclass
class AdapterConfig:
    """Fields shared by every injected method (PEFT's names and defaults).

    Subclasses set the class attribute ``peft_type`` (``"LORA"``, ``"IA3"``, ...) and add
    their own dataclass fields. Unknown keys met by ``from_dict`` land in ``extra``.
    """

    peft_type: ClassVar[str] = ""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.target_modules = _norm_targets(self.target_modules, "target_modules")
        self.exclude_modules = _norm_targets(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (list, tuple, set)):
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ValueError(
                "layers_to_transform and layers_pattern apply only when target_modules is a list of "
                "names, not a regex string (as in PEFT): list the module names instead"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to adapt), as in PEFT")
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value

    # ------------------------------------------------------------------ dict I/O

    def to_dict(self) -> Dict[str, Any]:
        """The ``adapter_config.json`` content: PEFT's keys, plus any kept unknown keys."""
        out: Dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = _plain(getattr(self, f.name))
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "AdapterConfig":
        """Build from an ``adapter_config.json`` dict (or ``peft_config.to_dict()``).

        Raises ``ValueError`` when ``peft_type`` names another method; keys this class
        does not know are kept in ``extra``.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = _plain(data)
        peft_type = data.get("peft_type", cls.peft_type)
        if str(peft_type).upper() != cls.peft_type:
            raise ValueError(f"{cls.__name__} reads peft_type {cls.peft_type!r}, got {peft_type!r}")
        known = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in ("peft_type", "extra")}
        extra.update(data.get("extra") or {})
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_peft(cls, config: Any) -> "AdapterConfig":
        """Convert a ``peft`` config object (anything with ``to_dict()``)."""
        return cls.from_dict(config_to_plain(config))


def _norm_targets(value: TargetSpec, what: str) -> TargetSpec:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{what} {value!r} is not a valid regular expression: {exc}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"{what} must be a list of module-name strings or a regex string, got {value!r}")
        return names
    raise TypeError(f"{what} must be a list of module names or a regex string, got {type(value).__name__}")


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: PEFT's ``LoraConfig`` fields, defaults and JSON form.

    ``target_modules``: list of module-name suffixes, a regex (full match on the module
    path) or ``"all-linear"`` (every Linear/Conv1D except the output head).
    ``rank_pattern`` / ``alpha_pattern``: ``{regex: value}`` overriding ``r`` /
    ``lora_alpha`` for the modules whose path ends with a match.
    ``bias``: ``"none"``, ``"all"`` (train and save every bias in the model) or
    ``"lora_only"`` (the biases of the adapted layers). ``lora_bias``: a trainable bias
    on ``lora_B``. ``init_lora_weights``: True (B = 0: a no-op adapter), ``"gaussian"``,
    or False (random A and B: a non-trivial adapter, for tests).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(
                f"lora_bias=True needs init_lora_weights True or False (as PEFT), got {self.init_lora_weights!r}"
            )
        for key, value in [("lora_alpha", self.lora_alpha)] + [
            (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()
        ]:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{key} must be a number, got {value!r}")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def rank_and_alpha(self, module_name: str) -> tuple:
        """``(r, lora_alpha)`` of one module, after ``rank_pattern`` / ``alpha_pattern``.

        The first pattern key whose regex matches the end of the module path (after a
        dot, or the whole path) wins, exactly as PEFT's ``get_pattern_key``.
        """
        return (
            self.rank_pattern.get(pattern_key(self.rank_pattern, module_name), self.r),
            self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_name), self.lora_alpha),
        )

    def unsupported(self) -> List[str]:
        """Features of this config fastpeft cannot run yet (empty when all is supported)."""
        problems = []
        if self.use_dora:
            problems.append("DoRA (use_dora=True) is not supported yet; use plain LoRA")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            problems.append(
                f"init_lora_weights={init!r} rewrites the base weights (PEFT subtracts the initial adapter "
                "from W whenever it creates or loads this adapter), which fastpeft does not do; convert it "
                "to a plain LoRA adapter with PEFT first: peft_model.save_pretrained(out_dir, "
                "path_initial_model_for_weight_conversion=<the saved initial adapter>)"
            )
        for key in ("target_parameters", "layer_replication", "trainable_token_indices", "megatron_config"):
            if self.extra.get(key):
                problems.append(f"{key}={self.extra[key]!r} is not supported")
        for key in ("use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config", "velora_config",
                    "monteclora_config", "kasa_config"):
            if self.extra.get(key):
                problems.append(f"{key} (a LoRA variant) is not supported")
        return problems


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first key whose regex matches the end of the
    module path (after a dot, or the whole path); None when none does."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
