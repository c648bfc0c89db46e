"""Bottleneck adapters' config (``peft_type`` ``"BOTTLENECK"``). PEFT has no counterpart;
its JSON uses PEFT's conventions (and AdapterHub's option names where they exist), so
fastpeft saves and loads it like any other adapter."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, List, Optional

from fastpeft.core.config import AdapterConfig
from fastpeft.kernels import bottleneck as _bn_kernels

__all__ = ["BottleneckConfig", "ACTIVATIONS", "check_activation"]

# Names accepted for the bottleneck non-linearity (swish is silu): the kernels'.
ACTIVATIONS = tuple(_bn_kernels.ACTIVATIONS)


def check_activation(activation: str) -> str:
    """Return ``activation`` lower-cased, or raise naming the accepted ones."""
    if not isinstance(activation, str) or activation.lower() not in _bn_kernels.ACTIVATIONS:
        raise ValueError(
            f"unknown non-linearity {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
        )
    return activation.lower()


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
    :class:`fastpeft.methods.bottleneck.layer.BottleneckLinear`).

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
