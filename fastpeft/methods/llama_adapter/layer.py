"""The wrapped attention module of LLaMA-Adapter: one adaption prompt and gate per adapter."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fastpeft.core.layer import ModuleWrapper
from fastpeft.methods.llama_adapter.op import adaption_output, adapter_queries

__all__ = ["AdaptionPrompt", "AdaptedAttention", "check_attention"]

_NEEDED = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config")


def check_attention(path: str, module: nn.Module) -> None:
    """Raise ``ValueError`` unless ``module`` is a Llama-style attention module."""
    missing = [a for a in _NEEDED if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"module {path!r} ({type(module).__name__}) is not a Llama-style attention module "
            f"(it lacks {', '.join(missing)}); adaption prompts wrap attention modules with "
            "q_proj/k_proj/v_proj/o_proj: check target_modules"
        )


class AdaptionPrompt(nn.Module):
    """One adapter's tensors in one layer, under PEFT's names: ``adaption_prompt``
    ``(1, adapter_len, hidden)``, standard normal (the official repository's embedding
    init), and ``adaption_gate`` ``(1,)``, zero (the "zero-init" that leaves the model
    unchanged until training moves it)."""

    def __init__(self, adapter_len: int, hidden_size: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        # Drawn exactly as PEFT draws them (empty().normal_(), then zeros), so the same
        # seed gives the same prompts.
        self.adaption_prompt = nn.Parameter(
            torch.empty(1, adapter_len, hidden_size, device=device, dtype=dtype).normal_()
        )
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    @property
    def adapter_len(self) -> int:
        return self.adaption_prompt.shape[1]


class AdaptedAttention(ModuleWrapper):
    """A Llama-style attention module (``base_layer``) plus the gated attention over
    the active adapter's adaption prompt (``op.py`` has the math). With no active adapter
    it is the base attention. The base's call signature and outputs are kept: the
    adapter term is added to the first output (the attention's output)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self._init_wrapper(base_layer)

    def add_adapter(self, adapter_name: str, adapter_len: int) -> None:
        self._check_new_name(adapter_name)
        weight = self.base_layer.q_proj.weight
        # PEFT's dtype: the projections', unless they are quantized (int8): then fp32.
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self._added(adapter_name, AdaptionPrompt(
            adapter_len, self.base_layer.config.hidden_size, device=weight.device, dtype=dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.active_adapter is None:
            return out
        adapter = self.adapters[self.active_adapter]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position is None:
            raise ValueError(
                "adaption prompts need the rotary position embeddings (cos, sin) that transformers' "
                "Llama decoder layers pass to attention as position_embeddings; none were given"
            )
        query = adapter_queries(self.base_layer, hidden, position)
        extra = adaption_output(self.base_layer, query, adapter.adaption_prompt, adapter.adaption_gate)
        if isinstance(out, tuple):
            return ((out[0] + extra).to(query.dtype), *out[1:])
        return (out + extra).to(query.dtype)
