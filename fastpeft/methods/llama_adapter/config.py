"""LLaMA-Adapter's config: PEFT's (0.21) ``AdaptionPromptConfig`` fields, defaults and JSON form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from fastpeft.core.config import AdapterConfig

__all__ = ["AdaptionPromptConfig", "ADAPTION_PROMPT_MODEL_TYPES"]

# The transformers model types whose attention this method wraps, with PEFT's default
# ``target_modules`` (the attention submodule's attribute name in each decoder layer).
ADAPTION_PROMPT_MODEL_TYPES: Dict[str, str] = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}

# Fields of AdapterConfig that PEFT's AdaptionPromptConfig does not have: written only
# when set (never, as check_config refuses them), so the JSON has exactly PEFT's keys.
_NOT_IN_PEFT = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter: PEFT's ``AdaptionPromptConfig``.

    ``adapter_len``: the number of adaption-prompt tokens per adapted layer.
    ``adapter_layers``: how many attention modules get a prompt, counted from the top
    (the last ``adapter_layers`` modules named ``target_modules``).
    ``target_modules``: the attention submodule's name in each decoder layer, one
    string (PEFT matches ``path.endswith("." + target_modules)``); default per model
    type (``"self_attn"`` for Llama and Mistral).
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    def problems(self) -> List[str]:
        """What keeps this config from running (empty: nothing)."""
        out = []
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            out.append(
                f"target_modules must be the attention submodule's name as one string (e.g. 'self_attn'), "
                f"as in PEFT; got {self.target_modules!r}"
            )
        for name in _NOT_IN_PEFT:
            if getattr(self, name) is not None:
                out.append(f"PEFT's AdaptionPromptConfig has no {name} (its checkpoints hold only the "
                           f"adaption prompts and gates); leave it unset")
        return out

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_IN_PEFT:
            if out.get(key) is None:
                out.pop(key, None)
        return out
