"""The wrapped attention module of LLaMA-Adapter: one adaption prompt and gate per adapter."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.batch import BatchPlan
from fastpeft.core.layer import ModuleWrapper
from fastpeft.methods.llama_adapter.op import (
    adaption_output, adapter_queries, gpt2_adaption_output, gpt2_queries,
)

__all__ = ["AdaptionPrompt", "AdaptedAttention", "attention_kind"]

# What each kind of attention module must have: Llama-style (Llama, Mistral) and GPT-2.
_NEEDED = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"),
    "gpt2": ("c_attn", "c_proj", "split_size", "head_dim", "config"),
}


def attention_kind(path: str, module: nn.Module) -> str:
    """``"llama"`` or ``"gpt2"``: which attention ``module`` is; ``ValueError`` if neither."""
    for kind, needed in _NEEDED.items():
        if all(hasattr(module, a) for a in needed):
            return kind
    raise ValueError(
        f"module {path!r} ({type(module).__name__}) is not an attention module adaption prompts can wrap "
        "(Llama-style with q_proj/k_proj/v_proj/o_proj, or GPT-2's with c_attn/c_proj): check target_modules"
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
    """A Llama-style or GPT-2 attention module (``base_layer``) plus the gated attention over
    the active adapter's adaption prompt (``op.py`` has the math). With no active adapter
    it is the base attention. The base's call signature and outputs are kept: the
    adapter term is added to the first output (the attention's output). In a mixed
    batch (``fastpeft.batch_adapters``; PEFT has none for this method) each row gets its
    own adapter's term, computed once per adapter for its rows; base rows get none."""

    def __init__(self, base_layer: nn.Module, path: str = "") -> None:
        super().__init__()
        self.kind = attention_kind(path, base_layer)
        self._init_wrapper(base_layer)

    def add_adapter(self, adapter_name: str, adapter_len: int) -> None:
        self._check_new_name(adapter_name)
        weight = (self.base_layer.q_proj if self.kind == "llama" else self.base_layer.c_proj).weight
        # PEFT's dtype: the projections', unless they are quantized (int8): then fp32.
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self._added(adapter_name, AdaptionPrompt(
            adapter_len, self.base_layer.config.hidden_size, device=weight.device, dtype=dtype))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        if self.batch_plan is not None:
            extra = self._mixed_term(first, args, kwargs)
        elif self.active_adapter is None:
            return out
        else:
            query = self._queries(args, kwargs)
            extra = self._term(self.adapters[self.active_adapter], query)
        if extra is None:
            return out
        first = (first + extra).to(extra.dtype)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def _queries(self, args: Any, kwargs: Any) -> torch.Tensor:
        """The attention's queries ``(B, H, T, d)`` (recomputed: the base returns none)."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.kind == "gpt2":
            if kwargs.get("encoder_hidden_states") is not None:
                raise NotImplementedError("adaption prompts do not wrap GPT-2 cross-attention")
            return gpt2_queries(self.base_layer, hidden)
        position = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if position is None:
            raise ValueError(
                "adaption prompts need the rotary position embeddings (cos, sin) that transformers' "
                "Llama decoder layers pass to attention as position_embeddings; none were given"
            )
        return adapter_queries(self.base_layer, hidden, position)

    def _term(self, adapter: AdaptionPrompt, query: torch.Tensor) -> torch.Tensor:
        """One adapter's term for the rows of ``query``, in the queries' dtype."""
        output = gpt2_adaption_output if self.kind == "gpt2" else adaption_output
        return output(self.base_layer, query, adapter.adaption_prompt, adapter.adaption_gate)

    def _make_row_plan(self, plan: BatchPlan) -> List[Tuple[str, torch.Tensor]]:
        """``[(adapter, its rows)]`` for this layer's adapters among the batch's rows;
        the other rows (None, or adapters without a prompt here) run the base."""
        device = next(iter(self.base_layer.parameters())).device
        rows = [(name, [i for i, n in enumerate(plan.rows) if n == name]) for name in self.adapters]
        return [(name, torch.tensor(idx, device=device)) for name, idx in rows if idx]

    def _mixed_term(self, first: torch.Tensor, args: Any, kwargs: Any) -> Optional[torch.Tensor]:
        """A mixed batch: each row's adapter term (zero for base rows); None when no row
        has an adapter in this layer. The queries are computed once for all rows."""
        self.batch_plan.check_batch(first)
        groups = self.__dict__.get("_row_plan") or []
        if not groups:
            return None
        query = self._queries(args, kwargs)
        extra = torch.zeros_like(first, dtype=query.dtype)
        for name, idx in groups:
            extra[idx] = self._term(self.adapters[name], query[idx])
        return extra
