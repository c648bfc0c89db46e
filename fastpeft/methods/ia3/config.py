"""(IA)^3's config: PEFT's (0.21) ``IA3Config`` fields, defaults and JSON form."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Union

from fastpeft.core.config import AdapterConfig, norm_targets

__all__ = ["IA3Config", "is_feedforward_module"]

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
        self.feedforward_modules = norm_targets(self.feedforward_modules, "feedforward_modules")
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
