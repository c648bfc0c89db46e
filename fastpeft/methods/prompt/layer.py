"""The hooked layer that feeds soft prompts to a Hugging Face model (child ``prompt_encoder``).

One forward pre-hook on the model (``with_kwargs``) rewrites the call's arguments as
PEFT's ``PeftModelForCausalLM.forward`` / ``prepare_inputs_for_generation`` do, so the
model stays a plain HF model: ``model(input_ids, attention_mask, labels)``,
``inputs_embeds`` and ``model.generate`` (KV cache) all work.

Prompt tuning and P-tuning (``kind == "prompt"``), when the cache is absent or empty
(a first forward, a generate prefill): ``inputs_embeds = [P; embed(input_ids)]``, the
attention mask gets ``n`` leading ones, labels ``n`` leading -100, ``position_ids`` and
``token_type_ids`` are dropped (PEFT ignores them) so the model counts positions
``0 .. n+L``. Later decode steps: the mask gets its ``n`` ones, positions are dropped
(the model counts from the cache, which holds the virtual tokens).

Sequence classification (``task_type="SEQ_CLS"``): the same, but labels stay as they are
and ``token_type_ids`` are kept, with type 0 for the virtual tokens (PEFT's
``PeftModelForSequenceClassification``).

Prefix tuning (``kind == "prefix"``): on an absent or empty cache, a new ``DynamicCache``
holds each layer's ``n`` prefix keys/values; the mask gets ``n`` leading ones and given
``position_ids`` are shifted by ``n`` on every step.

Mixed batches (prompt kinds, equal ``n``): row ``i`` gets its adapter's virtual tokens;
a row without one (None, or an adapter of another method) gets ``n`` *masked-out*
virtual tokens, i.e. ``n`` left-padding positions, and its own positions (given ones, or
``0 .. L``), so its outputs past the first ``n`` equal the model without the prompt.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.layer import HookedLayer

__all__ = ["SoftPromptLayer"]


class SoftPromptLayer(HookedLayer):
    """Soft-prompt adapters (prompt tuning, P-tuning, prefix tuning) of one model; each
    adapter is its encoder module (``fastpeft.methods.prompt.encoders``)."""

    def __init__(self) -> None:
        super().__init__()
        self._init_hooks()

    def add_adapter(self, adapter_name: str, encoder: nn.Module) -> None:
        self._check_new_name(adapter_name)
        self._added(adapter_name, encoder)

    @property
    def model(self) -> nn.Module:
        """The model this layer is attached to (a weak reference: no cycle of modules)."""
        ref = self.__dict__.get("_model_ref")
        model = None if ref is None else ref()
        if model is None:
            raise RuntimeError("this soft-prompt layer is not attached to a model")
        return model

    def attach(self, model: nn.Module) -> None:
        self.__dict__["_model_ref"] = weakref.ref(model)
        super().attach(model)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_model_ref", None)  # a weak reference does not pickle; attach sets it
        return state

    def hooks(self, model: nn.Module) -> List[Any]:
        return [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)]

    # ---------------------------------------------------------------- the hook

    def _row_names(self) -> Optional[List[Optional[str]]]:
        """One name per row (mixed batch), or ``[active]``; None: nothing to add."""
        plan = self.batch_plan
        if plan is not None:
            rows = [name if name in self.adapters else None for name in plan.rows]
            return rows if any(r is not None for r in rows) else None
        return None if self.active_adapter is None else [self.active_adapter]

    def _pre_forward(self, model: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
        rows = self._row_names()
        if rows is None:
            return None
        kw = _bind(model, args, kwargs)
        first = self.adapters[next(r for r in rows if r is not None)]
        if first.kind == "prefix":
            if len(rows) > 1:
                raise ValueError("batch_adapters: prefix-tuning adapters do not run in mixed batches")
            self._prefix_inputs(model, kw, first)
        else:
            self._prompt_inputs(model, kw, rows)
        return (), kw

    def _prompt_inputs(self, model: nn.Module, kw: Dict[str, Any], rows: List[Optional[str]]) -> None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        if len(rows) > 1 and len(rows) != batch:
            raise ValueError(f"batch_adapters: {len(rows)} row names for a batch of {batch} rows")
        names = rows if len(rows) > 1 else rows * batch
        n = _virtual_length(self, names)
        cache = kw.get("cache")
        prefill = cache is None or cache.get_seq_length() == 0
        device = (ids if ids is not None else embeds).device
        real = torch.tensor([name is not None for name in names], device=device)
        _extend_mask(kw, real, n, cache, prefill)
        _prompt_positions(kw, real, n, cache, prefill)
        classify = self.adapters[next(r for r in names if r is not None)].task_type == "SEQ_CLS"
        types = kw.pop("token_type_ids", None)
        if classify and types is not None and prefill:  # PEFT keeps them for classification, type 0 for the prompt
            kw["token_type_ids"] = torch.cat((types.new_zeros((types.shape[0], n)), types), dim=1)
        if not prefill:
            return
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        kw["inputs_embeds"] = torch.cat((self._prompts(names, n, embeds), embeds), dim=1)
        kw["input_ids"] = None
        if kw.get("labels") is not None and not classify:
            labels = kw["labels"]
            kw["labels"] = torch.cat((labels.new_full((labels.shape[0], n), -100), labels), dim=1)

    def _prompts(self, names: List[Optional[str]], n: int, embeds: torch.Tensor) -> torch.Tensor:
        """``(B, n, d)``: each row's virtual tokens (zeros for rows without; masked out)."""
        tokens = {name: self.adapters[name].tokens() for name in dict.fromkeys(names) if name is not None}
        if len(tokens) == 1 and None not in names:
            (only,) = tokens.values()
            return only.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        zeros = embeds.new_zeros((n, embeds.shape[-1]))
        return torch.stack([zeros if name is None else tokens[name].to(embeds.dtype) for name in names])

    def _prefix_inputs(self, model: nn.Module, kw: Dict[str, Any], encoder: nn.Module) -> None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        n = encoder.num_virtual_tokens
        mask = kw.get("attention_mask")
        if mask is not None:
            _require_2d(mask)
            kw["attention_mask"] = torch.cat((mask.new_ones((batch, n)), mask), dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + n
        kw.pop("token_type_ids", None)
        cache = kw.get("cache")
        if cache is None or cache.get_seq_length() == 0:
            kw["cache"] = prefix_cache(model, encoder, batch)


def prefix_cache(model: nn.Module, encoder: nn.Module, batch: int):
    """A ``DynamicCache`` holding each layer's prefix keys and values: the encoder's
    ``(n, num_layers * 2 * token_dim)`` output viewed as ``(B, n, 2 L, heads, head_dim)``,
    layer ``l``'s keys at ``2 l`` and values at ``2 l + 1`` (PEFT's layout)."""
    from transformers import DynamicCache

    kv = encoder.tokens()
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        kv = kv.to(dtype)
    n = kv.shape[0]
    kv = kv.view(1, n, encoder.num_layers * 2, encoder.num_heads, -1).expand(batch, -1, -1, -1, -1)
    layers = kv.permute(2, 0, 3, 1, 4).split(2)
    return DynamicCache(tuple((pair[0], pair[1]) for pair in layers))


# --------------------------------------------------------------------- argument rewriting


@functools.lru_cache(maxsize=64)
def _signature(forward) -> inspect.Signature:
    """``forward``'s signature without its ``self`` (read once per function: every
    decode step calls the hook)."""
    sig = inspect.signature(forward)
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        sig = sig.replace(parameters=params[1:])
    return sig


def _bind(model: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The call's arguments as keywords (positional ones named by ``forward``'s
    signature); ``past_key_values`` is spelled ``cache`` where the model's forward is."""
    sig = _signature(getattr(model.forward, "__func__", model.forward))
    bound = sig.bind_partial(*args, **kwargs).arguments
    kw: Dict[str, Any] = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            kw.update(value)
        else:
            kw[name] = value
    if "past_key_values" in kw and "cache" in sig.parameters:
        if kw.get("cache") is not None:
            raise ValueError("pass either cache or past_key_values, not both")
        kw["cache"] = kw.pop("past_key_values")
    elif "past_key_values" in sig.parameters and "cache" in kw:
        kw["past_key_values"] = kw.pop("cache")
    return kw


def _virtual_length(layer: SoftPromptLayer, names: List[Optional[str]]) -> int:
    lengths = {name: layer.adapters[name].num_virtual_tokens for name in dict.fromkeys(names) if name is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"batch_adapters: soft prompts of different lengths in one batch ({lengths}); mixed prompt batches "
            "need adapters with equal num_virtual_tokens"
        )
    return next(iter(lengths.values()))


def _require_2d(mask: torch.Tensor) -> None:
    if mask.dim() != 2:
        raise NotImplementedError(
            f"soft prompts extend a 2-D attention mask (batch, sequence); got {mask.dim()}-D: pass the 2-D padding mask"
        )


def _extend_mask(kw: Dict[str, Any], real: torch.Tensor, n: int, cache, prefill: bool) -> None:
    """``n`` leading mask entries: 1 for rows with a prompt, 0 (masked) for the others."""
    mask = kw.get("attention_mask")
    if mask is None and bool(real.all()):
        return
    if mask is None:
        ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        seen = 0 if prefill else cache.get_seq_length() - n
        mask = torch.ones((ids.shape[0], seen + ids.shape[1]), dtype=torch.long, device=ids.device)
    _require_2d(mask)
    kw["attention_mask"] = torch.cat((real[:, None].expand(-1, n).to(mask.dtype), mask), dim=1)


def _prompt_positions(kw: Dict[str, Any], real: torch.Tensor, n: int, cache, prefill: bool) -> None:
    """PEFT drops position ids (the model counts from 0 over the virtual tokens, or from
    the cache); rows without a prompt keep their own positions (given, or counted
    without the virtual tokens), so they run as the model alone."""
    given = kw.pop("position_ids", None)
    if bool(real.all()):
        return
    ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    batch, length = ids.shape[:2]
    seen = 0 if prefill else cache.get_seq_length()
    counted = torch.arange(seen, seen + length, device=ids.device).expand(batch, -1)
    own = given.expand(batch, -1) if given is not None else counted - (0 if prefill else n)
    if prefill:
        counted = torch.arange(n + length, device=ids.device).expand(batch, -1)
        own = torch.cat((own.new_zeros((batch, n)), own), dim=1)
    kw["position_ids"] = torch.where(real[:, None], counted, own.to(counted.dtype))
