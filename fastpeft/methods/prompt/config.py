"""PEFT's (0.21) prompt-learning configs: ``PromptTuningConfig``, ``PromptEncoderConfig``
(P-tuning) and ``PrefixTuningConfig``, with PEFT's field names, defaults and JSON form.

``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules``
are filled from the model's config at inject, as PEFT's
``_prepare_prompt_learning_config`` does (prefix tuning on grouped-query attention:
``token_dim = head_dim * num_key_value_heads``, ``num_attention_heads = num_key_value_heads``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

from fastpeft.core.config import AdapterConfig

__all__ = [
    "PromptLearningConfig", "PromptTuningConfig", "PromptTuningInit", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PrefixTuningConfig",
]


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


# AdapterConfig fields that PEFT's prompt-learning configs do not have: never written.
_NOT_IN_PEFT = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields every prompt-learning config shares (PEFT's ``PromptLearningConfig``)."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError(f"{type(self).__name__} takes no target_modules: soft prompts enter at the model's input")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise NotImplementedError(
                "num_transformer_submodules=2 (encoder-decoder models) is not supported: fastpeft's soft prompts "
                "run on decoder-only models"
            )

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_IN_PEFT:
            out.pop(key, None)
        return out


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` learned embeddings before the
    input. ``prompt_tuning_init``: RANDOM (``nn.Embedding``'s N(0, 1)), SAMPLE_VOCAB (the
    embeddings of random vocabulary tokens) or TEXT (the embeddings of
    ``prompt_tuning_init_text``'s tokens, repeated or cut to length). TEXT needs a
    tokenizer: ``tokenizer`` (an object, never saved) or ``tokenizer_name_or_path``
    (loaded with ``AutoTokenizer.from_pretrained``)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[Dict[str, Any]] = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = PromptTuningInit(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).value
        if self.prompt_tuning_init == PromptTuningInit.TEXT.value:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer= or tokenizer_name_or_path=")

    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer", None)
        return out


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al.): virtual-token embeddings through an encoder, an MLP
    (Linear-ReLU-Linear-ReLU-Linear) or a bidirectional LSTM then a 2-layer MLP. A saved
    checkpoint holds the encoder's output only (``prompt_embeddings``), as PEFT's."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(kind).value


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang): per-layer key/value prefixes of ``num_virtual_tokens``
    positions, entering as past keys/values; ``prefix_projection``: made by a
    Linear-Tanh-Linear MLP (``encoder_hidden_size``) from virtual-token embeddings."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
