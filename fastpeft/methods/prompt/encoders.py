"""The modules that make an adapter's virtual tokens (one per adapter), with PEFT's
parameter names, so a state dict reads the same as PEFT's ``prompt_encoder.<name>``.

Each has ``tokens()``: the adapter's ``(num_virtual_tokens, width)`` output, the same
for every row of a batch (PEFT computes it per row from the same indices), and
``kind``: ``"prompt"`` (embeddings before the input, width ``token_dim``) or ``"prefix"``
(per-layer keys and values, width ``num_layers * 2 * token_dim``).

In ``inference_mode`` (a loaded checkpoint), every encoder is a plain embedding of its
saved output, as PEFT builds it: the checkpoint holds the output, not the encoder.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fastpeft.methods.prompt.config import (
    PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit,
)

__all__ = ["PromptEmbedding", "PromptEncoder", "PrefixEncoder", "text_init_ids"]


class _VirtualTokens(nn.Module):
    kind = "prompt"

    def _indices(self) -> torch.Tensor:
        return torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    def tokens(self) -> torch.Tensor:
        """``(num_virtual_tokens, width)``: the adapter's virtual tokens."""
        return self.encode(self.embedding(self._indices()))


def text_init_ids(tokenizer, text: str, n: int) -> torch.Tensor:
    """PEFT's TEXT init ids: the text's token ids, repeated or cut to ``n``."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    return torch.tensor(ids, dtype=torch.long)


class PromptEmbedding(_VirtualTokens):
    """Prompt tuning: ``P = E[0..n)``, an ``nn.Embedding(n, token_dim)`` initialised at
    random, from random vocabulary rows, or from a text's token embeddings."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: Optional[nn.Module]) -> None:
        super().__init__()
        n = config.num_virtual_tokens
        self.embedding = nn.Embedding(n, config.token_dim)
        init = config.prompt_tuning_init
        if config.inference_mode or init == PromptTuningInit.RANDOM.value:
            return
        if word_embeddings is None:
            raise ValueError(f"prompt_tuning_init={init!r} needs the model's input embeddings; found none")
        if init == PromptTuningInit.SAMPLE_VOCAB.value:
            ids = torch.randint(0, word_embeddings.num_embeddings, (n,), dtype=torch.long)
        else:
            ids = text_init_ids(_tokenizer(config), config.prompt_tuning_init_text, n)
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)


def _tokenizer(config: PromptTuningConfig):
    if config.tokenizer is not None:
        return config.tokenizer
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)


class PromptEncoder(_VirtualTokens):
    """P-tuning: ``P = MLP(E)`` (Linear-ReLU-Linear-ReLU-Linear) or
    ``P = MLP(BiLSTM(E))`` (LSTM: ``encoder_num_layers`` layers, ``encoder_dropout``)."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.has_encoder = not config.inference_mode
        if not self.has_encoder:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=d, hidden_size=h, num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(h * 2, h * 2), nn.ReLU(), nn.Linear(h * 2, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        if not self.has_encoder:
            return embeds
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(embeds.unsqueeze(0))[0])[0]
        return self.mlp_head(embeds)


class PrefixEncoder(_VirtualTokens):
    """Prefix tuning: ``KV = E`` (``E``: ``(n, num_layers * 2 * token_dim)``) or, with
    ``prefix_projection``, ``KV = W2 tanh(W1 E + b1) + b2`` (``E``: ``(n, token_dim)``)."""

    kind = "prefix"

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        d, layers, n = config.token_dim, config.num_layers, config.num_virtual_tokens
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, layers * 2 * d),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, layers * 2 * d)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.transform(embeds) if self.prefix_projection else embeds
