"""The adapter attention of LLaMA-Adapter, in PyTorch.

For one wrapped attention module with ``H`` query heads, ``G`` key/value heads (GQA:
each serves ``H / G`` query heads), head size ``d``, an adaption prompt
``P`` (``1 x L x hidden``) and a gate ``g`` (one scalar, zero at init):

    q   = rope(q_proj(h))                               (B, H, T, d)  the layer's queries
    K_P = k_proj(P),  V_P = v_proj(P)                    (1, G, L, d)  no rope on the prompt
    A   = softmax_fp32(q K_P^T / sqrt(d))                (B, H, T, L)  no mask: every query sees all L
    out = attention(h) + o_proj( (g * A) V_P )           (B, T, hidden)

exactly PEFT's ``AdaptedAttention`` (0.21): the queries are recomputed from the hidden
states (the base attention does not return them), ``o_proj``'s bias (if any) enters the
adapter term as well, the softmax runs in fp32 and is cast back to the queries' dtype
before the gate scales it. With ``g = 0`` the model is the base model, yet the prompt
gets a gradient through ``g``'s once ``g`` moves.

GPT-2 (PEFT's ``AdaptedAttentionGPT``): ``q``, ``K_P``, ``V_P`` are the three parts of
``c_attn`` (of ``h`` and of ``P``), no rope, no GQA, and the adapter term is added
*without* the output projection: ``out = attention(h) + (g * A) V_P``.

No Triton kernel: the adapter attention covers only ``L`` (about 10) keys, so it is a
small pair of batched GEMMs beside the base attention. Fusing it into the attention
output is worth doing only if it measures faster on a GPU; until it is measured, it
stays in PyTorch.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["rotate_half", "adapter_queries", "adaption_output", "gpt2_queries", "gpt2_adaption_output"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's rotary helper: ``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def adapter_queries(attn: nn.Module, hidden: torch.Tensor,
                    position_embeddings: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention's rotated queries ``(B, H, T, d)``, recomputed from ``hidden``
    ``(B, T, hidden)`` as PEFT does (``q * cos + rotate_half(q) * sin``)."""
    bsz, q_len, _ = hidden.shape
    query = attn.q_proj(hidden).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin


def adaption_output(attn: nn.Module, query: torch.Tensor, prompt: torch.Tensor,
                    gate: torch.Tensor) -> torch.Tensor:
    """``o_proj((g * softmax(q K_P^T / sqrt(d))) V_P)`` of shape ``(B, T, hidden)`` in the
    queries' dtype (module docstring). ``prompt`` ``(1, L, hidden)`` and ``gate`` ``(1,)``
    may be stored in fp32 over a half-precision model: they are cast to its dtype here."""
    heads, head_dim = query.shape[1], query.shape[3]
    prompt = prompt.to(attn.k_proj.weight.dtype) if hasattr(attn.k_proj, "weight") else prompt
    key = attn.k_proj(prompt)
    value = attn.v_proj(prompt)
    adapter_len = prompt.shape[1]
    kv_heads = key.shape[-1] // head_dim
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k_proj gives {key.shape[-1]} features: not a whole number of key/value heads "
                         f"of size {head_dim} dividing the {heads} query heads")
    # (1, G, L, d) -> (1, H, L, d): each key/value head serves H / G query heads (PEFT's
    # repeat_interleave); the batch dimension broadcasts. PEFT derives G from k_proj's
    # in/out features, which is this G whenever hidden = H * d (it fails otherwise).
    key = key.view(1, adapter_len, kv_heads, head_dim).transpose(1, 2)
    value = value.view(1, adapter_len, kv_heads, head_dim).transpose(1, 2)
    key = torch.repeat_interleave(key, heads // kv_heads, dim=1)
    value = torch.repeat_interleave(value, heads // kv_heads, dim=1)
    return attn.o_proj(_gated_attention(query, key, value, gate))


def _gated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     gate: torch.Tensor) -> torch.Tensor:
    """``(g * softmax_fp32(q k^T / sqrt(d))) v`` as ``(B, T, H * d)``; ``key``/``value``
    ``(1, H, L, d)`` broadcast over the batch."""
    bsz, _, q_len, head_dim = query.shape
    dtype = query.dtype
    scores = torch.matmul(query, key.transpose(2, 3).to(dtype)) / math.sqrt(head_dim)
    probs = gate.to(dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = torch.matmul(probs, value.to(dtype).expand(bsz, -1, -1, -1))
    return out.transpose(1, 2).reshape(bsz, q_len, -1)


def gpt2_queries(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """GPT-2's queries ``(B, H, T, d)``: the first part of ``c_attn(hidden)``."""
    query = attn.c_attn(hidden).split(attn.split_size, dim=2)[0]
    return query.view(*query.shape[:-1], -1, attn.head_dim).transpose(1, 2)


def gpt2_adaption_output(attn: nn.Module, query: torch.Tensor, prompt: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    """GPT-2's adapter term ``(g * A) V_P`` ``(B, T, hidden)`` (no ``c_proj``, as PEFT)."""
    heads, head_dim = query.shape[1], query.shape[3]
    prompt = prompt.to(attn.c_attn.weight.dtype)
    _, key, value = attn.c_attn(prompt).split(attn.split_size, dim=2)
    adapter_len = prompt.shape[1]
    key = key.view(1, adapter_len, heads, head_dim).transpose(1, 2)
    value = value.view(1, adapter_len, heads, head_dim).transpose(1, 2)
    return _gated_attention(query, key, value, gate)
