"""LoRA as a Method: how its layers attach, its checkpoint keys, what trains.

Checkpoint keys (PEFT's, without ``base_model.model.``), per adapted layer at ``<path>``:
``<path>.lora_A.weight (r, in)``, ``<path>.lora_B.weight (out, r)`` and, with
``lora_bias``, ``<path>.lora_B.bias (out,)``; with ``bias="lora_only"`` the adapted
layers' base biases (``<path>.base_layer.bias``), with ``bias="all"`` every bias of the
model, as PEFT saves them. A MiCA adapter (``init_lora_weights="mica"``) trains only its
``lora_A``, as in PEFT; inits fastpeft cannot make load fine but are refused for new
adapters (``check_new``).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from fastpeft.core.checkpoint import AdapterCheckpointError
from fastpeft.core.method import Method, all_layer_types
from fastpeft.core.modules_to_save import ModulesToSaveWrapper
from fastpeft.core import targets as core_targets
from fastpeft.core.targets import linear_types, named_modules_of
from fastpeft.methods.lora.config import LORA_INIT_CHOICES, LoraConfig
from fastpeft.methods.lora.layer import FastLoRALinear

__all__ = ["LoraMethod", "LORA", "default_lora_targets", "lora_pairs"]

# Default targets per transformers ``model_type`` when a config leaves ``target_modules``
# unset, as PEFT chooses them (tests/test_peft_config.py checks every entry against the
# installed peft). With peft installed, its own table is used, covering more models.
LORA_DEFAULTS: Dict[str, List[str]] = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt")},
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    **{t: ["query_key_value"] for t in ("gpt_neox", "falcon", "bloom")},
}


def default_lora_targets(model_type: Optional[str]) -> Optional[List[str]]:
    """PEFT's default LoRA ``target_modules`` for a ``model_type`` (None: no default)."""
    table = core_targets.peft_table("TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING") or LORA_DEFAULTS
    found = table.get(model_type) if model_type else None
    return list(found) if found else None


class LoraMethod(Method):
    peft_type = "LORA"
    config_cls = LoraConfig
    layer_types = (FastLoRALinear,)
    target_types = linear_types()

    def check_config(self, config: LoraConfig) -> List[str]:
        return config.unsupported()

    def check_new(self, config: LoraConfig) -> List[str]:
        if config.init_lora_weights in LORA_INIT_CHOICES:
            return []
        return [
            f"init_lora_weights={config.init_lora_weights!r} is not supported for new adapters; "
            f"use one of {LORA_INIT_CHOICES} (saved adapters with any init load fine)"
        ]

    def default_targets(self, model_type: Optional[str]) -> Optional[Dict[str, Any]]:
        targets = default_lora_targets(model_type)
        return {"target_modules": targets} if targets else None

    @staticmethod
    def _layer_args(path: str, config: LoraConfig) -> Dict[str, Any]:
        r, alpha = config.rank_and_alpha(path)
        # An init fastpeft cannot make (a loaded adapter's): its weights replace these.
        init = config.init_lora_weights if config.init_lora_weights in LORA_INIT_CHOICES else True
        return dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                    init_lora_weights=init, lora_bias=config.lora_bias)

    def build_layer(self, path: str, module: nn.Module, config: LoraConfig, adapter_name: str,
                    backend: str) -> nn.Module:
        # A Conv1D is always fan_in_fan_out and an nn.Linear never, whatever the config
        # says (PEFT corrects that config mistake too).
        return FastLoRALinear.wrap(module, adapter_name=adapter_name, backend=backend, **self._layer_args(path, config))

    def add_to_layer(self, path: str, layer: FastLoRALinear, config: LoraConfig, adapter_name: str) -> None:
        layer.add_adapter(adapter_name, **self._layer_args(path, config))

    def layer_keys(self, layer: FastLoRALinear, adapter_name: str) -> Dict[str, torch.Tensor]:
        adapter = layer.adapters[adapter_name]
        keys = {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B}
        if adapter.lora_bias is not None:
            keys["lora_B.bias"] = adapter.lora_bias
        return keys

    def save_keys(self, model: nn.Module, adapter_name: str, config: LoraConfig) -> Dict[str, torch.Tensor]:
        out = super().save_keys(model, adapter_name, config)
        if config.bias == "lora_only":
            for path, layer in self.layers(model):
                if adapter_name in layer.adapter_names and layer.bias is not None:
                    out[f"{path}.base_layer.bias"] = layer.bias
        elif config.bias == "all":
            out.update(_all_biases(model, adapter_name, [p for p, _ in self.layers(model)]))
        return out

    def trainable(self, model: nn.Module, adapter_name: str, config: LoraConfig) -> List[nn.Parameter]:
        params = super().trainable(model, adapter_name, config)
        if config.is_mica():  # PEFT trains only lora_A of a MiCA adapter
            frozen = {id(layer.adapters[adapter_name].lora_B) for _, layer in self.layers(model)
                      if adapter_name in layer.adapter_names}
            params = [p for p in params if id(p) not in frozen]
        return params


def _all_biases(model: nn.Module, adapter_name: str, lora_paths: List[str]) -> Dict[str, torch.Tensor]:
    """Every bias of the model keyed as PEFT saves them with ``bias="all"`` (the adapted
    layers' under ``base_layer``)."""
    out: Dict[str, torch.Tensor] = {}
    wrappers = named_modules_of(model, (ModulesToSaveWrapper,))
    skip = {n for n, _ in wrappers}
    layer_types = all_layer_types()
    for name, wrapper in wrappers:
        # PEFT saves these too (beside the wrapper's own ``<name>.bias``): the original's
        # bias and the adapter copy's, with the adapter name removed.
        for key, tensor in wrapper.state_dict(keep_vars=True).items():
            if not (key == "bias" or key.endswith(".bias")):
                continue
            parts = key.split(".")
            if parts[0] == "modules_to_save" and parts[1] != adapter_name:
                continue
            out[_without_adapter_name(f"{name}.{key}", adapter_name)] = tensor
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, layer_types):
            if isinstance(module, FastLoRALinear) and module.bias is not None:
                out[f"{name}.base_layer.bias"] = module.bias
            continue
        if any(name.startswith(p + ".") for p in lora_paths):
            continue
        bias = module._parameters.get("bias")
        if bias is None and "bias" in module._buffers and "bias" not in module._non_persistent_buffers_set:
            bias = module._buffers["bias"]
        if isinstance(bias, torch.Tensor):
            out[f"{name}.bias" if name else "bias"] = bias
    return out


def _without_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT's rule for dropping the adapter name from a state-dict key."""
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, suffix = key.rpartition(".")
    if head.endswith(f".{adapter_name}"):
        head = head[: -len(adapter_name) - 1]
    return f"{head}.{suffix}"


LORA = LoraMethod()

# --------------------------------------------------------------------- reading keys back

# ``<path>.lora_A.weight`` as PEFT saves it, or ``<path>.lora_A.<adapter>.weight`` as a
# live PEFT model's state dict holds it.
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _not_lora(key: str) -> str:
    if "lora_B" in key and key.endswith(".bias"):
        return "lora_bias (unsupported by the pool)"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude (unsupported by the pool)"
    if "lora_embedding" in key:
        return "LoRA on an embedding (unsupported by the pool)"
    if ".lora_" not in key:
        return ("a trained base tensor: the pool serves LoRA A/B only, not modules_to_save or "
                "bias='all'/'lora_only' biases; load such an adapter with fastpeft.load_adapter")
    return "unsupported"


def lora_pairs(tensors: Mapping[str, Any], where: str) -> Dict[str, Tuple[Any, Any]]:
    """``{layer path: (A, B)}`` from LoRA checkpoint keys (the inverse of the key map for
    plain LoRA layers); any other key is an ``AdapterCheckpointError`` naming it."""
    halves: Dict[str, Dict[str, Any]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(str(key))
        if m is None:
            raise AdapterCheckpointError(
                f"{where}: tensor {key!r} is not a LoRA A/B weight ({_not_lora(str(key))}); pass only the "
                "adapter's tensors (what PEFT saves: peft.get_peft_model_state_dict), not a whole model's state dict"
            )
        halves.setdefault(m.group("path"), {})[m.group("ab")] = t
    pairs = {}
    for path, h in halves.items():
        if set(h) != {"A", "B"}:
            missing = "lora_B" if "A" in h else "lora_A"
            raise AdapterCheckpointError(f"{where}: layer {path!r} has no {missing} weight")
        pairs[path] = (h["A"], h["B"])
    return pairs
