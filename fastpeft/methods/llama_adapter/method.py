"""LLaMA-Adapter as a Method: PEFT's ``ADAPTION_PROMPT``.

Attaches by wrapping (``Attach.WRAP``) the attention modules of the top
``adapter_layers`` decoder layers: the modules whose path ends in
``"." + target_modules``, the last ``adapter_layers`` of them in model order (PEFT's
rule). Llama and Mistral (``self_attn``) and GPT-2 (``attn``), as PEFT. Checkpoint
keys, PEFT's own (without ``base_model.model.``), e.g.
``model.layers.1.self_attn.adaption_prompt`` ``(1, adapter_len, hidden)`` and
``model.layers.1.self_attn.adaption_gate`` ``(1,)``: the default key map (each adapter
module's state dict under its layer's path). Only these train. Not mergeable (the
adapter attention is not a weight delta). Mixed batches (each row its own adapter, or
none) run, which PEFT's ``adapter_names=`` does not offer for this method.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.method import Attach, Method
from fastpeft.core.targets import model_type_of
from fastpeft.methods.llama_adapter.config import ADAPTION_PROMPT_MODEL_TYPES, AdaptionPromptConfig
from fastpeft.methods.llama_adapter.layer import AdaptedAttention

__all__ = ["AdaptionPromptMethod", "ADAPTION_PROMPT"]

_PROMPT, _GATE = ".adaption_prompt", ".adaption_gate"


def _layer_paths(keys) -> List[str]:
    return sorted({k[: -len(_PROMPT)] for k in keys if k.endswith(_PROMPT)}
                  | {k[: -len(_GATE)] for k in keys if k.endswith(_GATE)})


class AdaptionPromptMethod(Method):
    peft_type = "ADAPTION_PROMPT"
    config_cls = AdaptionPromptConfig
    attach = Attach.WRAP
    layer_types = (AdaptedAttention,)
    target_types = (nn.Module,)  # AdaptedAttention checks for an attention it can wrap
    merges = False

    def check_config(self, config: AdaptionPromptConfig) -> List[str]:
        return config.problems()

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        name = ADAPTION_PROMPT_MODEL_TYPES.get(model_type or "")
        return {"target_modules": name} if name else None

    def find_targets(self, model: nn.Module, config: AdaptionPromptConfig,
                     adapted_types: Tuple[type, ...]) -> List[str]:
        """The last ``adapter_layers`` modules whose path ends in ``.<target_modules>``."""
        model_type = model_type_of(model)
        if model_type not in ADAPTION_PROMPT_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type for adaption prompts: {model_type!r}; fastpeft wraps the attention "
                f"of {sorted(ADAPTION_PROMPT_MODEL_TYPES)} models"
            )
        suffix = "." + config.target_modules
        # Inside an adapted attention the base sits at '<path>.base_layer': never a match.
        paths = [name for name, _ in model.named_modules() if name.endswith(suffix)]
        if len(paths) < config.adapter_layers:
            raise ValueError(
                f"the config asks for adapter_layers={config.adapter_layers}, but the model has only "
                f"{len(paths)} modules named {config.target_modules!r}; lower adapter_layers"
            )
        return paths[-config.adapter_layers:]

    def build_layer(self, path: str, module: nn.Module, config: AdaptionPromptConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        layer = AdaptedAttention(module, path)
        layer.add_adapter(adapter_name, config.adapter_len)
        return layer

    def add_to_layer(self, path: str, layer: AdaptedAttention, config: AdaptionPromptConfig,
                     adapter_name: str) -> None:
        layer.add_adapter(adapter_name, config.adapter_len)

    def check_checkpoint(self, config: AdaptionPromptConfig, source: Dict[str, torch.Tensor],
                         targets: Dict[str, torch.Tensor], where: str) -> None:
        """Name the config's ``adapter_layers`` or ``adapter_len`` when the tensors were
        made with another value of it."""
        have, want = _layer_paths(source), _layer_paths(targets)
        if have and have != want:
            raise ValueError(
                f"{where}: the checkpoint holds adaption prompts for {len(have)} layer(s) ({', '.join(have)}), "
                f"but its config's adapter_layers={config.adapter_layers} places them at {len(want)} layer(s) "
                f"({', '.join(want)}) of this model: the config and the weights do not belong together, "
                "or the adapter was made for another base model"
            )
        for key, src in source.items():
            if key.endswith(_PROMPT) and src.dim() == 3 and src.shape[1] != config.adapter_len:
                raise ValueError(
                    f"{where}: {key} holds {src.shape[1]} prompt tokens, but the config's "
                    f"adapter_len={config.adapter_len}: the config and the weights do not belong together"
                )


ADAPTION_PROMPT = AdaptionPromptMethod()
