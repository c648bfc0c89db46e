"""LoRA's config: PEFT's ``LoraConfig`` fields, defaults and JSON form, and its rules for
each layer's rank, alpha and scaling (the rules the serving pool applies too)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Tuple, Union

from fastpeft.core.config import AdapterConfig, pattern_key

__all__ = ["LoraConfig", "LORA_INIT_CHOICES", "BASE_REWRITING_INITS", "lora_scaling"]

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


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (rsLoRA)."""
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


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

    def rank_and_alpha(self, module_name: str) -> Tuple[int, float]:
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
        if self.use_dora and self.lora_bias:
            problems.append("DoRA (use_dora=True) together with lora_bias=True is not supported")
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

    def is_mica(self) -> bool:
        """A MiCA adapter (``init_lora_weights=\"mica\"``): PEFT trains only its ``lora_A``."""
        init = self.init_lora_weights
        return isinstance(init, str) and init.lower() == "mica"
