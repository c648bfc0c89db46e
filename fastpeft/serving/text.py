"""Text in and out of ``ServingEngine``: prompts encoded with a tokenizer, new tokens
decoded, and the progress bar over the decode steps."""
from __future__ import annotations

from typing import Any, List, Sequence, Union

import torch

__all__ = ["Prompts", "encode_prompts", "decode_text", "progress_bar"]

Prompts = Union[str, Sequence[str], torch.Tensor, Sequence[Sequence[int]]]


def _token_ids(encoded: Any) -> List[int]:
    """One prompt's ids from what a tokenizer returned for it (a mapping with
    ``input_ids``, or the ids themselves; a list or a ``(1, L)``/``(L,)`` tensor)."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        ids = ids.tolist()
    return [int(i) for i in ids]


def encode_prompts(prompts: Prompts, tokenizer: Any) -> Union[torch.Tensor, Sequence[Sequence[int]]]:
    """Text prompts (a string, or a list of strings) as token-id lists through
    ``tokenizer``; token ids pass through unchanged."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor) or not any(isinstance(p, str) for p in prompts):
        return prompts
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be all strings or all token-id lists, not a mix")
    if tokenizer is None:
        raise TypeError(
            "generate got text prompts but the engine has no tokenizer: pass "
            "ServingEngine(model, pool, tokenizer=tokenizer), or give token ids (a tensor or lists of ints)"
        )
    return [_token_ids(tokenizer(p)) for p in prompts]


def decode_text(tokenizer: Any, new: torch.Tensor, eos_ids: List[int]) -> List[str]:
    """Each row's new tokens as text: up to and including its first EOS, decoded with
    ``skip_special_tokens=True`` (the tokenizer's ``decode``)."""
    texts = []
    for row in new.tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over the decode steps, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="token")
