"""Configs of the (IA)^3 and bottleneck-adapter methods.

``IA3Config`` reads and writes PEFT's (0.21) ``adapter_config.json`` for ``peft_type``
``"IA3"``. ``BottleneckConfig`` (``peft_type`` ``"BOTTLENECK"``) has no PEFT
counterpart; its JSON uses the same conventions (and AdapterHub's option names where
they exist), so fastpeft saves and loads it like any other adapter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Union

from fastpeft.config import AdapterConfig, _norm_targets
from fastpeft.ops_adapters import check_activation

__all__ = ["IA3Config", "BottleneckConfig", "is_feedforward_module"]

Names = Optional[Union[List[str], str]]

# Fields of AdapterConfig that PEFT's IA3Config does not have: written only when set,
# so that the JSON has exactly PEFT's keys.
_NOT_IN_PEFT_IA3 = ("layers_to_transform", "layers_pattern")


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3: PEFT's ``IA3Config`` fields, defaults and JSON form.

    ``target_modules``: the layers that get a vector (list of name suffixes, a regex
    with full match, or ``"all-linear"``); fastpeft needs it set (PEFT's per-architecture
    defaults are not built in). ``feedforward_modules``: those among them whose *input*
    is scaled (PEFT's rule: a regex with full match, or a list matched with
    ``path.endswith(entry)``); with lists it must be a subset of ``target_modules``.
    ``init_ia3_weights``: True (``l = 1``, the model is unchanged), False (random).
    ``fan_in_fan_out``: as PEFT; GPT-2's ``Conv1D`` layers are always read as (in, out).
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: Names = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.feedforward_modules = _norm_targets(self.feedforward_modules, "feedforward_modules")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            missing = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if missing:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules (as in PEFT); "
                    f"{missing} are not in target_modules={self.target_modules}"
                )

    def is_feedforward(self, module_path: str) -> bool:
        """Whether the target at ``module_path`` scales its input (PEFT's rule)."""
        return is_feedforward_module(self.feedforward_modules, module_path)

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_IN_PEFT_IA3:
            if out.get(key) is None:
                out.pop(key, None)
        return out


def is_feedforward_module(feedforward_modules: Names, module_path: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: regex full match, or list suffix match."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(key) for key in feedforward_modules)


# Module-name suffixes of the output projection that ends each sub-layer, for common
# transformers architectures (Llama/Mistral/Qwen, OPT/BART, GPT-2, BERT).
ATTN_OUTPUT_MODULES = ["o_proj", "out_proj", "attn.c_proj", "attention.output.dense"]
FFN_OUTPUT_MODULES = ["down_proj", "fc2", "mlp.c_proj", "output.dense"]

ADAPTER_TYPES = ("houlsby", "pfeiffer")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

    Each targeted output projection ``h = x W^T + b`` becomes
    ``y = h + scaling * up(f(down(h)))`` (with optional layer norms, see
    :class:`fastpeft.bottleneck.BottleneckLinear`).

    Placement: ``adapter_type="houlsby"`` adapts the attention output and the
    feed-forward output of every block (``mh_adapter`` and ``output_adapter``);
    ``"pfeiffer"`` the feed-forward output only. ``mh_adapter``/``output_adapter`` given
    explicitly override the preset. The modules are found by name suffix in
    ``attn_output_modules`` / ``ffn_output_modules``; when ``target_modules`` is set it
    is used as is instead (PEFT's matching rules).

    Width: ``bottleneck_size``, or ``features // reduction_factor`` when it is None.
    ``non_linearity``: relu, gelu, silu, swish or tanh. ``ln_before`` / ``ln_after``: a
    learned layer norm on the adapter's input / output; ``residual_before_ln``: the
    residual adds ``h`` (True) or the normalised ``h`` (False). ``init_weights``: True
    zero-initialises the up-projection (the model is unchanged at init).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    mh_adapter: Optional[bool] = None
    output_adapter: Optional[bool] = None
    bottleneck_size: Optional[int] = None
    reduction_factor: Optional[float] = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    ln_before: bool = False
    ln_after: bool = False
    residual_before_ln: bool = True
    init_weights: bool = True
    attn_output_modules: List[str] = None  # type: ignore[assignment]
    ffn_output_modules: List[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_type, str) or self.adapter_type.lower() not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}")
        self.adapter_type = self.adapter_type.lower()
        self.non_linearity = check_activation(self.non_linearity)
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0
        ):
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.bottleneck_size is None:
            rf = self.reduction_factor
            if rf is None or isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
                raise ValueError(f"set bottleneck_size, or a positive reduction_factor (got {rf!r})")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if self.attn_output_modules is None:
            self.attn_output_modules = list(ATTN_OUTPUT_MODULES)
        if self.ffn_output_modules is None:
            self.ffn_output_modules = list(FFN_OUTPUT_MODULES)
        if self.mh_adapter is None:
            self.mh_adapter = self.adapter_type == "houlsby"
        if self.output_adapter is None:
            self.output_adapter = True
        if self.target_modules is None:
            if not (self.mh_adapter or self.output_adapter):
                raise ValueError("mh_adapter and output_adapter are both False: the config adapts nothing")
            targets: List[str] = []
            if self.mh_adapter:
                targets += self.attn_output_modules
            if self.output_adapter:
                targets += [m for m in self.ffn_output_modules if m not in targets]
                if not self.mh_adapter and self.exclude_modules is None:
                    # e.g. BERT: "output.dense" also ends "attention.output.dense".
                    self.exclude_modules = list(self.attn_output_modules)
            self.target_modules = targets
        super().__post_init__()
