"""The soft-prompt Methods: prompt tuning, P-tuning and prefix tuning (PEFT's
``PROMPT_TUNING``, ``P_TUNING``, ``PREFIX_TUNING``).

All three attach through hooks at one child of the model, ``prompt_encoder`` (a
:class:`SoftPromptLayer`; adapters of the three methods share it, one active at a time).
Their checkpoint is PEFT's: one tensor, ``prompt_embeddings`` (no ``base_model.model.``
prefix), the encoder's *output* ``(num_virtual_tokens, width)``. A loaded adapter is a
plain embedding of it (``inference_mode``), as PEFT builds it.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from fastpeft.core.method import Attach, Method
from fastpeft.methods.prompt.config import (
    PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig,
)
from fastpeft.methods.prompt.encoders import PrefixEncoder, PromptEmbedding, PromptEncoder
from fastpeft.methods.prompt.layer import SoftPromptLayer

__all__ = ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "model_dims"]

KEY = "prompt_embeddings"
_TASKS = (None, "CAUSAL_LM", "SEQ_CLS")


def model_dims(model: nn.Module, prefix: bool) -> Dict[str, int]:
    """``num_layers``, ``token_dim``, ``num_attention_heads`` of the model, as PEFT's
    ``_prepare_prompt_learning_config`` reads them (prefixes: the key/value width)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("soft prompts need a transformers model (with .config)")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    dims = {"num_layers": cfg.num_hidden_layers, "token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads}
    kv_heads = getattr(cfg, "num_key_value_heads", None)
    if prefix and kv_heads is not None:
        head_dim = getattr(cfg, "head_dim", None) or dims["token_dim"] // dims["num_attention_heads"]
        dims["token_dim"], dims["num_attention_heads"] = head_dim * kv_heads, kv_heads
    return dims


class _SoftPrompt(Method):
    attach = Attach.HOOKS
    hook_site = "prompt_encoder"
    layer_types = (SoftPromptLayer,)
    merges = False
    mixed_batches = True
    key_prefix = "base_model."  # PEFT's prompt learning: modules_to_save under base_model.
    bare_keys = (KEY,)  # ... and the prompt without any prefix
    prefix = False

    def check_config(self, config: PromptLearningConfig) -> List[str]:
        if config.task_type not in _TASKS:
            return [f"task_type {config.task_type!r}: fastpeft's soft prompts run with task_type CAUSAL_LM or SEQ_CLS"]
        if self.prefix and config.task_type == "SEQ_CLS":
            return ["prefix tuning with task_type SEQ_CLS (use prompt tuning or P-tuning for classification)"]
        return []

    def _prepare(self, model: nn.Module, config: PromptLearningConfig) -> None:
        """Fill the model's sizes into ``config`` (PEFT fills unset fields), refusing a
        config whose sizes differ from the model's."""
        dims = model_dims(model, self.prefix)
        config.num_transformer_submodules = config.num_transformer_submodules or 1
        checked = tuple(dims) if self.prefix else ("token_dim",)  # what the tensors' shapes depend on
        for key, value in dims.items():
            if getattr(config, key) is None:
                setattr(config, key, value)
            elif key in checked and getattr(config, key) != value:
                raise ValueError(
                    f"{config.peft_type}: the config's {key}={getattr(config, key)} does not fit this model "
                    f"({key}={value}); the adapter was made for another base model"
                )
        if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim

    def encoder(self, model: nn.Module, config: PromptLearningConfig) -> nn.Module:
        raise NotImplementedError

    def _new_encoder(self, model: nn.Module, config: PromptLearningConfig) -> nn.Module:
        self._prepare(model, config)
        enc = self.encoder(model, config)
        enc.num_virtual_tokens = config.num_virtual_tokens
        enc.num_layers, enc.num_heads = config.num_layers, config.num_attention_heads
        enc.task_type = config.task_type
        return enc

    def build_layer(self, path, model, config, adapter_name, backend) -> SoftPromptLayer:
        layer = SoftPromptLayer()
        layer.add_adapter(adapter_name, self._new_encoder(model, config))
        return layer

    def add_to_layer(self, path, layer, config, adapter_name) -> None:
        layer.add_adapter(adapter_name, self._new_encoder(layer.model, config))

    def _encoder_of(self, model: nn.Module, adapter_name: str) -> nn.Module:
        return getattr(model, self.hook_site).adapters[adapter_name]

    def save_keys(self, model, adapter_name, config) -> Dict[str, torch.Tensor]:
        enc = self._encoder_of(model, adapter_name)
        if type(enc).encode is PromptEmbedding.encode or not _has_encoder(enc):
            return {KEY: enc.embedding.weight}
        with torch.no_grad():
            return {KEY: enc.tokens()}

    def load_keys(self, model, adapter_name, config) -> Dict[str, torch.Tensor]:
        return {KEY: self._encoder_of(model, adapter_name).embedding.weight}

    def trainable(self, model, adapter_name, config) -> List[nn.Parameter]:
        return list(self._encoder_of(model, adapter_name).parameters())

    def check_checkpoint(self, config, source, targets, where) -> None:
        if KEY not in source or KEY not in targets:
            return
        if getattr(config, "prefix_projection", False) and not config.inference_mode:
            raise ValueError(
                f"{where}: a prefix_projection=True checkpoint holds the projected prefix, not the MLP that made "
                "it, so it cannot be loaded for training (is_trainable=True), as in PEFT; load it for inference"
            )
        got, want = tuple(source[KEY].shape), tuple(targets[KEY].shape)
        if len(got) != 2 or got == want:
            return
        if got[0] != want[0]:
            raise ValueError(
                f"{where}: prompt_embeddings has {got[0]} virtual tokens but the config says "
                f"num_virtual_tokens={want[0]}; the checkpoint and its adapter_config.json do not match"
            )
        what = "num_layers * 2 * token_dim" if self.prefix else "token_dim"
        raise ValueError(
            f"{where}: prompt_embeddings rows have width {got[1]}, but this model expects {what} = {want[1]}; "
            "the adapter was made for another base model (other hidden size or number of layers)"
        )


def _has_encoder(enc: nn.Module) -> bool:
    return getattr(enc, "has_encoder", False) or getattr(enc, "prefix_projection", False)


class PromptTuningMethod(_SoftPrompt):
    peft_type = "PROMPT_TUNING"
    config_cls = PromptTuningConfig

    def encoder(self, model, config):
        return PromptEmbedding(config, model.get_input_embeddings())


class PromptEncoderMethod(_SoftPrompt):
    peft_type = "P_TUNING"
    config_cls = PromptEncoderConfig

    def encoder(self, model, config):
        return PromptEncoder(config)


class PrefixTuningMethod(_SoftPrompt):
    peft_type = "PREFIX_TUNING"
    config_cls = PrefixTuningConfig
    mixed_batches = False
    prefix = True

    def encoder(self, model, config):
        return PrefixEncoder(config)


PROMPT_TUNING = PromptTuningMethod()
P_TUNING = PromptEncoderMethod()
PREFIX_TUNING = PrefixTuningMethod()
